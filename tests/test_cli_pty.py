"""The `downloads` command in a real terminal: a pseudo-terminal that is the command's
controlling terminal, so Ctrl-C is a byte typed into it (the line discipline turns it into
SIGINT), and what rich draws is read back as a person would see it."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from typing import Any

import pytest

from tests.harness import worker_env
from tests.server import body
from tests.terminal import Terminal
from tests.test_cli_e2e import cli


@pytest.fixture
def env(redis_server, tmp_path) -> dict[str, str]:
    return worker_env(redis_server.url, tmp_path)


def test_live_view_draws_bars_and_a_batch_total_without_skipped_bytes(
    env, worker, origin, tmp_path
):
    tag = uuid.uuid4().hex
    present, dest = f"{origin.url}/bytes/3000000?seed=p{tag}", f"pty/{tag}.bin"
    first = cli(env, "submit", present, "--dest", dest, "--wait")
    assert first.returncode == 0, first.stderr
    # Already on disk with its checksum given: skipped, no request; none of its bytes count.
    digest = hashlib.sha256(body(3000000, f"p{tag}")).hexdigest()
    slow = f"{origin.url}/bytes/600000?rate=200000&seed={tag}"
    listing = tmp_path / "batch.txt"
    listing.write_text(f"# a present file and a slow one\n{present} {dest} {digest}\n\n{slow}\n")
    term = Terminal(env, "submit", "-i", str(listing), "--wait")
    term.expect(r"/585\.9 KiB")  # its bar, drawn while it runs
    assert term.finish() == 0, term.text
    screen = term.text
    assert re.search(r"\d+\.\d (KiB|MiB)/s", screen)  # its speed
    # Binary units, as the tables below: never rich's decimal kB or MB.
    assert not re.search(r"\d (kB|MB|GB)\b", screen)
    assert "\x1b[" in term.raw  # redrawn in place
    assert "already present" in screen
    # The batch's last frame: the slow one's 600,000 bytes, not the 3 MB already present.
    assert re.search(r"batch ━+ 585\.9/585\.9 KiB .* 2/2 done \(2 succeeded, 0 failed\)", screen)
    assert "2 of 2 succeeded (1 already present), 585.9 KiB" in screen
    # Each download's whole id, to copy into `downloads wait` or `cancel`.
    assert len(set(re.findall(r"[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}", screen))) == 2


def test_ctrl_c_leaves_downloads_running_and_says_how_to_follow_them(env, worker, origin):
    tag = uuid.uuid4().hex
    urls = [f"{origin.url}/bytes/1500000?rate=300000&seed={tag}{i}" for i in range(2)]
    term = Terminal(env, "submit", *urls, "--wait")
    term.expect(r"/1\.4 MiB")  # running, drawn
    term.type(b"\x03")  # Ctrl-C, as typed
    assert term.finish() == 130, term.text
    screen = term.text
    assert "Traceback" not in screen and "KeyboardInterrupt" not in screen
    hint = re.search(r"downloads wait ([0-9a-f -]+)", screen)
    assert hint, screen
    ids = hint.group(1).split()
    assert len(ids) == 2
    # They went on without the command: waiting again sees them succeed.
    done = cli(env, "wait", *ids, "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    assert [r["state"] for r in rows] == ["SUCCESS", "SUCCESS"]
    assert sorted(r["url"] for r in rows) == sorted(urls)


def test_input_file_shows_a_progress_line_while_submitting(env, redis_server, origin, tmp_path):
    parked = f"parked-{uuid.uuid4().hex[:6]}"  # no worker consumes it
    listing = tmp_path / "urls.txt"
    listing.write_text("".join(f"{origin.url}/bytes/10?n={i}\n" for i in range(2500)))
    term = Terminal(env, "submit", "-i", str(listing), "--queue", parked)
    assert term.finish() == 0
    assert "submitted 1000/2500" in term.text and "submitted 2500/2500" in term.text
    import redis

    client = redis.Redis(port=redis_server.port, db=0)
    assert client.llen(parked) == 2500
    client.delete(parked)


def test_an_unknown_id_has_a_dash_for_its_url_in_the_terminal_table(env, redis_server):
    nobody = str(uuid.uuid4())
    term = Terminal(env, "result", nobody)
    assert term.finish() == 1
    row = next(line for line in term.text.splitlines() if line.startswith(nobody))
    assert row.split("│")[1].strip() == "unknown" and row.split("│")[-1].strip() == "-"
    assert "None" not in term.text
