"""The `downloads` command and the Python client, for real: `python -m download_client.cli` in a
subprocess against the test Redis, real workers and the loopback origin; batches of 50 with
failures mixed in; exit codes; a live view on a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import uuid
from typing import Any

import pytest

from download_client.client import BatchProgress, connect, submit_many, wait
from download_client.settings import Settings
from tests.harness import ROOT, TASK, free_port, wait_for, worker_env


@pytest.fixture
def env(redis_server, tmp_path) -> dict[str, str]:
    return worker_env(redis_server.url, tmp_path)


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "download_client.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def gallery(origin: Any, good: int, bad: int) -> tuple[list[str], list[str]]:
    tag = uuid.uuid4().hex[:6]
    ok = [f"{origin.url}/bytes/{2000 + i}?seed={tag}{i}" for i in range(good)]
    missing = [f"{origin.url}/missing/{tag}-{i}.png" for i in range(bad)]
    return ok, missing


def test_submit_50_and_wait_json(env, worker, origin, flower):
    ok, missing = gallery(origin, 45, 5)
    urls = ok[:20] + missing + ok[20:]
    done = cli(env, "submit", *urls, "--wait", "--json")
    assert done.returncode == 1, done.stderr  # some failed
    rows = json.loads(done.stdout)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50  # one id per download
    assert [r["url"] for r in rows] == urls
    by_state = {r["url"]: r for r in rows}
    for url in ok:
        assert by_state[url]["state"] == "SUCCESS"
        assert by_state[url]["result"]["size"] == int(url.split("/bytes/")[1].split("?")[0])
    for url in missing:
        assert by_state[url]["state"] == "FAILURE"
        assert "404" in by_state[url]["error"]
    # Flower saw every one, from the CLI's task-sent to the worker's final event.
    for row in rows:
        info = flower.wait_state(row["id"], row["state"])
        assert info["sent"] is not None
        assert info["worker"] == worker.hostname


def test_submit_wait_table_lists_successes_and_failures(env, worker, origin):
    ok, missing = gallery(origin, 8, 2)
    done = cli(env, "submit", *ok, *missing, "--wait")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["STATE", "SIZE", "PATH", "/", "ERROR", "ID", "URL"]
    rows = [line.split() for line in lines if line.startswith(("SUCCESS", "FAILURE"))]
    assert len({r[-2] for r in rows}) == 10  # each download's own id, beside its URL
    assert all(_is_id(r[-2]) for r in rows)
    assert sum(r[0] == "SUCCESS" for r in rows) == 8
    assert sum(line.startswith("FAILURE") and "404" in line for line in lines) == 2
    assert "Error(" not in done.stdout and "{" not in done.stdout  # the message, as written
    assert lines[-1].startswith("8 of 10 succeeded")


def _is_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def test_submit_without_wait_prints_one_id_per_url(env, flower, origin):
    parked = f"parked-{uuid.uuid4().hex[:6]}"
    urls = [f"{origin.url}/bytes/10?n={i}" for i in range(3)]
    done = cli(env, "submit", *urls, "--queue", parked, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["url"] for r in rows] == urls and len({r["id"] for r in rows}) == 3
    for row in rows:  # task-sent comes from the CLI itself: no worker consumes this queue
        assert flower.wait_state(row["id"], "PENDING")["sent"] is not None
    plain = cli(env, "submit", urls[0], "--queue", parked)
    assert plain.returncode == 0 and plain.stdout.split()[1] == urls[0]


def test_python_client_batch_of_50(env, worker, origin):
    app = connect(Settings.from_env(env))
    ok, missing = gallery(origin, 45, 5)
    results = submit_many(app, [*missing, *ok[:-1], {"url": ok[-1], "dest": "batch/last.bin"}])
    assert len({r.id for r in results}) == 50
    batch = BatchProgress(results)
    done = wait(results, timeout=120, on_update=batch.update)
    assert set(done) == {r.id for r in results}
    summary = batch.summary()
    assert summary["succeeded"] == 45 and summary["failed"] == 5, summary
    assert summary["running"] == summary["waiting"] == 0
    assert summary["bytes"] == sum(int(u.split("/bytes/")[1].split("?")[0]) for u in ok)
    assert (worker.download_dir / "batch/last.bin").exists()
    assert sorted(r.state for r in done.values()).count("FAILURE") == 5


def test_status_shows_workers_queue_depth_and_active(env, start_worker, origin, client):
    queue = f"status-{uuid.uuid4().hex[:6]}"
    w = start_worker(queue=queue, concurrency=1)
    slow_url = f"{origin.url}/bytes/4000000?rate=200000&token=sekrit-{uuid.uuid4().hex}"
    slow = client.send_task(TASK, kwargs={"url": slow_url}, queue=queue)
    wait_for(lambda: slow.state == "PROGRESS", 30, "the slow download to run")
    for i in range(2):
        client.send_task(TASK, kwargs={"url": f"{origin.url}/bytes/10?s={i}"}, queue=queue)

    def status() -> dict[str, Any] | None:
        done = cli(env, "status", "--queue", queue, "--json")
        assert done.returncode == 0, done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body if body["queue_depth"] == 2 and body["active"] else None

    body = wait_for(status, 30, "status to show 2 waiting and one active")
    assert w.hostname in body["workers"]
    active = next(a for a in body["active"] if a["id"] == slow.id)
    assert active["worker"] == w.hostname
    assert active["progress"]["total"] == 4000000 and active["progress"]["bytes"] > 0
    assert "sekrit" not in json.dumps(body)
    assert active["kwargs"] == {"url": slow_url.split("token=")[0] + "token=***"}
    text = cli(env, "status", "--queue", queue)
    assert text.returncode == 0
    assert f"queue {queue!r}: 2 waiting" in text.stdout
    assert w.hostname in text.stdout and slow.id in text.stdout
    client.control.revoke(slow.id, terminate=True)
    wait_for(lambda: slow.state == "REVOKED", 30, "the slow download to be revoked")


def test_exit_codes(env, worker, origin, client):
    url = f"{origin.url}/bytes/10"
    assert cli(env, "submit", url, url, "--dest", "x").returncode == 2
    bad_header = cli(env, "submit", url, "--header", "no-colon-here")
    assert bad_header.returncode == 2 and "NAME:VALUE" in bad_header.stderr
    assert cli(env).returncode == 2
    for bad in (["notaurl"], [url, "--dest", "../x"], [url, "--sha256", "xyz"]):
        refused = cli(env, "submit", *bad)  # checked before anything is sent
        assert refused.returncode == 2 and refused.stderr.startswith("error: "), bad
        assert refused.stdout == ""
    bad_setting = cli({**env, "DOWNLOAD_READ_TIMEOUT": "soon"}, "status")
    assert bad_setting.returncode == 2 and "DOWNLOAD_READ_TIMEOUT='soon'" in bad_setting.stderr
    assert "Traceback" not in bad_setting.stderr

    nowhere = {**env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (("status",), ("submit", url)):
        done = cli(nowhere, *args)
        assert done.returncode == 3, (args, done.stderr)
        assert "cannot reach" in done.stderr

    slow = f"{origin.url}/bytes/1000000?rate=500000&seed={uuid.uuid4().hex}"
    timed_out = cli(env, "submit", slow, "--wait", "--timeout", "0.5", "--json")
    assert timed_out.returncode == 4, timed_out.stderr
    assert json.loads(timed_out.stdout)[0]["state"] not in ("SUCCESS", "FAILURE")

    good = client.send_task(TASK, kwargs={"url": url})
    bad = client.send_task(TASK, kwargs={"url": f"{origin.url}/missing"})
    good.get(timeout=60)
    bad.get(timeout=60, propagate=False)
    assert cli(env, "result", good.id, "--json").returncode == 0
    both = cli(env, "result", good.id, bad.id, "--json")
    assert both.returncode == 1
    rows = json.loads(both.stdout)
    assert [r["state"] for r in rows] == ["SUCCESS", "FAILURE"]
    assert rows[0]["url"] == url and rows[0]["result"]["url"] == url
    assert rows[1]["url"] is None and "404" in rows[1]["error"]


def test_live_progress_on_a_terminal(env, worker, origin):
    slow = f"{origin.url}/bytes/600000?rate=300000&seed={uuid.uuid4().hex}"
    fast = f"{origin.url}/bytes/1000?seed={uuid.uuid4().hex}"
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "download_client.cli", "submit", slow, fast, "--wait"],
        cwd=ROOT,
        env={**env, "LINES": "40", "COLUMNS": "160"},
        stdout=secondary,
        stderr=subprocess.PIPE,
    )
    os.close(secondary)
    screen = _read_all(primary, proc)
    assert proc.stderr is not None
    with proc.stderr:
        assert proc.wait(60) == 0, proc.stderr.read()
    assert "%" in screen and "[#" in screen  # a bar drawn while the slow one ran
    assert "\x1b[" in screen  # redrawn in place
    assert "running" in screen and "2/2 done (2 succeeded, 0 failed)" in screen
    assert "2 of 2 succeeded" in screen


def _read_all(fd: int, proc: subprocess.Popen[bytes]) -> str:
    chunks = []
    while True:
        ready, _, _ = select.select([fd], [], [], 60)
        if not ready:
            break
        try:
            data = os.read(fd, 65536)
        except OSError:  # the other side closed (Linux: EIO)
            break
        if not data:
            break
        chunks.append(data)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_with_only_the_broker_set_worker_and_cli_meet_on_the_same_results(
    redis_server, start_worker, origin, tmp_path
):
    broker = redis_server.url  # redis://127.0.0.1:port, no database: 0 for the queue
    queue = f"broker-only-{uuid.uuid4().hex[:6]}"
    start_worker(queue=queue, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND="")
    env = {**worker_env(broker, tmp_path), "CELERY_BROKER_URL": broker}
    del env["CELERY_RESULT_BACKEND"]
    url = f"{origin.url}/bytes/1234?seed=broker-only"
    done = cli(env, "submit", url, "--queue", queue, "--wait", "--timeout", "60", "--json")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["state"] == "SUCCESS" and row["result"]["size"] == 1234
