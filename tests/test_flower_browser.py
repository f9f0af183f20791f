"""Flower's task list in a real headless browser (Debian's chromium): a running download shows
its state, its progress and its redacted URL, with the columns `make run` and compose set."""

from __future__ import annotations

import html
import re
import shutil
import struct
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml

from tests.flower_process import USER, make_run_default
from tests.harness import ROOT, TASK, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1600, 900
SIZE = 20_000_000  # 19.1 MiB at 1 MB/s: running for as long as the test looks at it
PROGRESS = re.compile(r"\d+(\.\d)? (B|KiB|MiB) of 19\.1 MiB \(\d{1,2}%\)")


def test_compose_shows_the_columns_make_run_shows():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    columns = compose["services"]["flower"]["environment"]["FLOWER_TASKS_COLUMNS"]
    assert columns == make_run_default("FLOWER_TASKS_COLUMNS")
    assert {"state", "result", "kwargs", "runtime"} <= set(columns.split(","))
    assert f"`{columns}`" in (ROOT / "docs" / "flower.md").read_text()  # what the docs list


def chromium(url: str, profile: Path, output: str) -> str:
    """One headless run on `url` once its scripts ran (DataTables fills the list from
    /tasks/datatable): `--dump-dom` answers the DOM, `--screenshot=PATH` writes a PNG."""
    assert CHROMIUM is not None
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # root in CI
            "--disable-gpu",
            # Nothing but the page itself: no updates, sync, pings or name lookups elsewhere.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--no-pings",
            "--no-first-run",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
            f"--user-data-dir={profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "--virtual-time-budget=5000",
            output,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def cells(dom: str, task_id: str) -> dict[str, str]:
    """The task's row of the list, as column slug -> the text a person sees."""
    # With horizontal scrolling DataTables draws the header twice: the slugs, once each.
    header = list(dict.fromkeys(re.findall(r'<th[^>]*data-column="(\w+)"', dom)))
    row = re.search(rf'<tr id="{task_id}"[^>]*>(.*?)</tr>', dom, re.S)
    if row is None:
        return {}
    texts = [
        html.unescape(re.sub(r"<[^>]+>", "", cell)).strip()
        for cell in re.findall(r"<td[^>]*>(.*?)</td>", row[1], re.S)
    ]
    return dict(zip(header, texts, strict=True))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_task_list_shows_a_running_downloads_progress(flower, worker, origin, client, tmp_path):
    secret = f"tok-{uuid.uuid4().hex}"
    url = f"{origin.url}/bytes/{SIZE}?rate=1000000&token={secret}"
    running = client.send_task(
        TASK, kwargs={"url": url, "dest": f"browser/{uuid.uuid4().hex}.bin"}, queue=worker.queue
    )
    try:
        flower.wait_state(running.id, "PROGRESS", timeout=30)
        page = f"http://{USER}:{flower.password}@127.0.0.1:{flower.port}/tasks"
        shot = tmp_path / "flower-tasks.png"
        doms: list[str] = []

        def listed() -> dict[str, str]:
            doms.append(chromium(page, tmp_path / "profile", "--dump-dom"))
            return cells(doms[-1], running.id)

        row = wait_for(listed, 20, "the running download in the rendered list")
        dom = doms[-1]
        assert row["name"] == TASK
        assert row["state"] == "PROGRESS"
        assert PROGRESS.search(row["result"]), row["result"]
        assert f"'url': '{origin.url}/bytes/{SIZE}?rate=1000000&token=***'" in row["kwargs"]
        assert row["received"] and row["started"] and row["worker"] == worker.hostname
        assert running.id in row["uuid"]
        assert secret not in dom
        chromium(page, tmp_path / "profile", f"--screenshot={shot}")
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)
    finally:
        flower.post(f"/api/task/revoke/{running.id}?terminate=true")
    assert wait_for(lambda: flower.wait_result(running.id)["state"] == "REVOKED", 30, "revoked")
