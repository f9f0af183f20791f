"""The live view's drawing, with a real rich console writing to a string: how often it redraws
does not grow with the number of downloads that move or end (its CPU on a terminal is measured
by the benchmark, bench/live_view.py)."""

from __future__ import annotations

import io
import re
import uuid

from celery.result import AsyncResult
from rich.console import Console

from download_client.live import LiveView


def test_downloads_that_end_between_two_redraws_are_printed_in_one() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, height=40)
    ids = [str(uuid.uuid4()) for _ in range(300)]
    urls = {rid: f"http://origin.test/{n}.bin" for n, rid in enumerate(ids)}
    with LiveView(urls, console, lambda some: {}) as view:
        first_frame = len(out.getvalue())
        for rid in ids:
            result = AsyncResult(rid)
            view.update(result, "STARTED", None)
            view.update(result, "PROGRESS", {"bytes": 512 * 1024, "total": 1024 * 1024})
            view.update(result, "SUCCESS", {"size": 1024 * 1024, "path": f"{rid}.bin"})
        # 900 updates, 300 bars added and removed: nothing drawn until the view redraws.
        assert len(out.getvalue()) == first_frame
        view.draw()
        frame = out.getvalue()[first_frame:]
        assert all(rid in frame for rid in ids)
        assert "300/300 done (300 succeeded, 0 failed)" in frame
        assert "300.0/300.0 MiB" in frame  # the batch, in binary units


def test_the_batch_line_counts_running_waiting_by_reason_and_queued() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=300, height=40)
    ids = [str(uuid.uuid4()) for _ in range(10)]
    with LiveView(dict.fromkeys(ids), console, lambda some: {}) as view:
        for rid in ids[:2]:
            view.update(AsyncResult(rid), "PROGRESS", {"bytes": 10, "total": 100})
        for rid in ids[2:7]:
            view.update(AsyncResult(rid), "WAITING", {"reason": "origin", "origin": "http://o:1"})
        view.update(AsyncResult(ids[7]), "WAITING", {"reason": "destination", "dest": "a.bin"})
        view.update(AsyncResult(ids[1]), "WAITING", {"reason": "origin", "origin": "http://p:1"})
        view.draw()
        frame = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", out.getvalue())
    line = "1 running, 7 waiting (6 for an origin slot, 1 for a busy destination), 2 queued"
    assert line in frame
    assert ids[1][:8] not in frame.rsplit("batch", 1)[-1]  # no bar once it waits again


def test_a_waiting_row_says_what_it_waits_for() -> None:
    from download_client import tables

    origin = tables.row("i", None, "WAITING", {"reason": "origin", "since": 90.0, "origin": "o"})
    assert tables.detail(origin, 100.0) == ("", "waiting for a slot at o (10 s)")
    dest = tables.row("j", None, "WAITING", {"reason": "destination", "since": 100, "dest": "d"})
    assert tables.detail(dest, 100.0)[1] == "waiting for d, which another download is writing (0 s)"
