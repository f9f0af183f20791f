"""Flower's task list in a real headless browser (Debian's chromium): a running download shows
its state, its progress and its redacted URL, a failed one its reason, with the columns `make run`
and compose set, every one of them within a 1400 px window (measured in the page, over the
DevTools protocol)."""

from __future__ import annotations

import re
import struct
import urllib.parse
import uuid

import pytest
import yaml

from tests.browser import CHROMIUM, HEIGHT, WIDTH, cells, chromium, column_edges
from tests.flower_process import USER, make_run_default
from tests.harness import ROOT, TASK, wait_for

SIZE = 90_000_000  # 85.8 MiB at 1 MB/s: running for as long as the test looks at it
PROGRESS = re.compile(r"\d+(\.\d)? (B|KiB|MiB) of 85\.8 MiB \(\d{1,2}%\)")


def test_compose_shows_the_columns_make_run_shows():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    columns = compose["services"]["flower"]["environment"]["FLOWER_TASKS_COLUMNS"]
    assert columns == make_run_default("FLOWER_TASKS_COLUMNS")
    assert {"state", "result", "exception", "kwargs", "runtime"} <= set(columns.split(","))
    assert f"`{columns}`" in (ROOT / "docs" / "flower.md").read_text()  # what the docs list


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_task_list_shows_a_running_downloads_progress(
    flower, start_worker, origin, client, tmp_path
):
    # A worker of its own, so that the list can be narrowed to this test's two downloads
    # (`?worker=`): other tests' tasks would push them off the list's first page.
    # Wide timeouts: on a loaded machine the first byte can be late, and a retry is not what
    # this test looks at.
    worker = start_worker(
        queue=f"browser-{uuid.uuid4().hex[:6]}",
        DOWNLOAD_CONNECT_TIMEOUT="30",
        DOWNLOAD_READ_TIMEOUT="30",
    )
    secret = f"tok-{uuid.uuid4().hex}"
    url = f"{origin.url}/bytes/{SIZE}?rate=1000000&token={secret}"
    running = client.send_task(
        TASK, kwargs={"url": url, "dest": f"browser/{uuid.uuid4().hex}.bin"}, queue=worker.queue
    )
    failed = client.send_task(
        TASK, kwargs={"url": f"{origin.url}/missing/{uuid.uuid4().hex}.png"}, queue=worker.queue
    )
    try:
        flower.wait_state(failed.id, "FAILURE", timeout=30)
        flower.wait_state(running.id, "PROGRESS", timeout=30)
        page = (
            f"http://{USER}:{flower.password}@127.0.0.1:{flower.port}/tasks"
            f"?worker={urllib.parse.quote(worker.hostname)}"
        )
        shot = tmp_path / "flower-tasks.png"
        doms: list[str] = []

        def listed() -> dict[str, str]:
            doms.append(chromium(page, tmp_path / "profile", "--dump-dom"))
            return cells(doms[-1], running.id)

        # Generous: each look starts a chromium, which takes seconds on a loaded machine.
        row = wait_for(listed, 60, "the running download in the rendered list")
        dom = doms[-1]
        assert row["name"] == TASK
        assert row["state"] == "PROGRESS"
        assert PROGRESS.search(row["result"]), row["result"]
        # The URL first: the cell shows its start.
        assert row["kwargs"].startswith(
            f"{{'url': '{origin.url}/bytes/{SIZE}?rate=1000000&token=***'"
        )
        assert row["worker"] == worker.hostname
        assert running.id in row["uuid"]
        assert secret not in dom
        # A failure's reason, in its own column.
        failed_row = cells(dom, failed.id)
        assert failed_row["state"] == "FAILURE"
        assert "HTTP 404 Not Found from 127.0.0.1:" in failed_row["exception"], failed_row
        # In a 1400 px window, without scrolling sideways: the columns up to the run time whole,
        # and the start of a failure's reason.
        width, edges = column_edges(page, tmp_path / "measured", running.id)
        assert width == WIDTH
        assert list(edges) == make_run_default("FLOWER_TASKS_COLUMNS").split(",")
        for name in ("name", "state", "result", "kwargs", "runtime"):
            assert 0 <= edges[name][0] < edges[name][1] <= WIDTH, edges
        assert edges["exception"][0] < WIDTH - 100, edges
        chromium(page, tmp_path / "profile", f"--screenshot={shot}")
        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)
    finally:
        flower.post(f"/api/task/revoke/{running.id}?terminate=true")
    assert wait_for(lambda: flower.wait_result(running.id)["state"] == "REVOKED", 30, "revoked")
