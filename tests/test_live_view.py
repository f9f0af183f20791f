"""The live view's drawing, with a real rich console writing to a string: how often it redraws
does not grow with the number of downloads that move or end (its CPU on a terminal is measured
by the benchmark, bench/live_view.py)."""

from __future__ import annotations

import io
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
