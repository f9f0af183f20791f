"""Flower's task list in a real headless browser (Debian's chromium): a running download shows
its state, its progress and its redacted URL, a failed one its reason, with the columns `make run`
and compose set, every one of them within a 1400 px window (measured in the page, over the
DevTools protocol)."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import shutil
import struct
import subprocess
import urllib.parse
import uuid
from pathlib import Path

import pytest
import requests
import yaml
from tornado.websocket import websocket_connect

from tests.flower_process import USER, make_run_default
from tests.harness import ROOT, TASK, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1400, 900
SIZE = 90_000_000  # 85.8 MiB at 1 MB/s: running for as long as the test looks at it
PROGRESS = re.compile(r"\d+(\.\d)? (B|KiB|MiB) of 85\.8 MiB \(\d{1,2}%\)")


def test_compose_shows_the_columns_make_run_shows():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    columns = compose["services"]["flower"]["environment"]["FLOWER_TASKS_COLUMNS"]
    assert columns == make_run_default("FLOWER_TASKS_COLUMNS")
    assert {"state", "result", "exception", "kwargs", "runtime"} <= set(columns.split(","))
    assert f"`{columns}`" in (ROOT / "docs" / "flower.md").read_text()  # what the docs list


def _flags(profile: Path) -> list[str]:
    assert CHROMIUM is not None
    return [
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
    ]


# In the page: once the task's row is drawn, the window's width and each column header's left
# and right edges (the header scrolls with the body: what is off it is off the screen).
_EDGES = """new Promise((done, failed) => {
  const started = Date.now();
  const look = () => {
    if (document.getElementById(%s)) {
      const heads = document.querySelectorAll(".dataTables_scrollHead th[data-column]");
      done(JSON.stringify({width: window.innerWidth, columns: Array.from(heads, th => {
        const box = th.getBoundingClientRect();
        return [th.dataset.column, box.left, box.right];
      })}));
    } else if (Date.now() - started > 20000) {
      failed(new Error("the row was not drawn"));
    } else {
      setTimeout(look, 100);
    }
  };
  look();
})"""


def column_edges(
    url: str, profile: Path, row_id: str
) -> tuple[int, dict[str, tuple[float, float]]]:
    """The window's width and each column's (left, right) in the task list, as laid out by a
    headless chromium at WIDTH x HEIGHT, read over the DevTools protocol."""
    proc = subprocess.Popen(
        [*_flags(profile), "--remote-debugging-port=0", url],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        wait_for(lambda: active.exists() and "\n" in active.read_text(), 30, "the DevTools port")
        port = int(active.read_text().split()[0])

        def page() -> str | None:
            with requests.get(f"http://127.0.0.1:{port}/json/list", timeout=5) as listing:
                targets = listing.json()
            found = [t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page"]
            return found[0] if found else None

        socket_url = wait_for(page, 30, "the page")
        # Until the page has loaded (an evaluation during the navigation loses its context).
        answer = json.loads(
            wait_for(lambda: asyncio.run(_evaluate(socket_url, row_id)), 30, "the list's layout")
        )
    finally:
        proc.kill()
        proc.wait(30)
    edges = {name: (left, right) for name, left, right in answer["columns"]}
    return answer["width"], edges


async def _evaluate(socket_url: str, row_id: str) -> str | None:
    conn = await websocket_connect(socket_url, max_message_size=2**24)
    params = {
        "expression": _EDGES % json.dumps(row_id),
        "awaitPromise": True,
        "returnByValue": True,
    }
    conn.write_message(json.dumps({"id": 1, "method": "Runtime.evaluate", "params": params}))
    try:
        while True:
            message = await conn.read_message()
            assert message is not None, "chromium closed the DevTools connection"
            reply = json.loads(message)
            if reply.get("id") == 1:
                value: str | None = reply.get("result", {}).get("result", {}).get("value")
                return value
    finally:
        conn.close()
        # Until the closing handshake ends and tornado closes the socket (None): left to the
        # garbage collector, the socket would be reported unclosed.
        with contextlib.suppress(Exception):
            while await asyncio.wait_for(conn.read_message(), 10) is not None:
                pass


def chromium(url: str, profile: Path, output: str) -> str:
    """One headless run on `url` once its scripts ran (DataTables fills the list from
    /tasks/datatable): `--dump-dom` answers the DOM, `--screenshot=PATH` writes a PNG."""
    done = subprocess.run(
        [*_flags(profile), "--virtual-time-budget=5000", output, url],
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
def test_task_list_shows_a_running_downloads_progress(
    flower, start_worker, origin, client, tmp_path
):
    # A worker of its own, so that the list can be narrowed to this test's two downloads
    # (`?worker=`): other tests' tasks would push them off the list's first page.
    worker = start_worker(queue=f"browser-{uuid.uuid4().hex[:6]}")
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
