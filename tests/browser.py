"""A headless chromium (Debian's) on pages served on 127.0.0.1: the DOM after the page's scripts
ran, a screenshot, and the column layout of Flower's task list read over the DevTools protocol."""

from __future__ import annotations

import asyncio
import contextlib
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import requests
from tornado.websocket import websocket_connect

from tests.harness import wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1400, 900


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


def listed_total(dom: str) -> int | None:
    """How many tasks Flower's list says match its search, or None before the list is drawn."""
    if "No tasks to show" in dom:
        return 0
    found = re.search(r"Showing \d+ to \d+ of (\d+) tasks", dom)
    return int(found[1]) if found else None
