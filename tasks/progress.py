"""PROGRESS reports of a running download."""

from __future__ import annotations

import json
import logging
import time

from celery import Task

from tasks.deliveries import REDIS_ERRORS

log = logging.getLogger(__name__)

UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def size_text(n: float) -> str:
    """Bytes as a person reads them: 512 B, 1.2 MiB."""
    for unit in UNITS:
        if n < 1024 or unit == UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def progress_text(done: int, total: int | None, held_s: float = 0.0) -> str:
    """One line for Flower's task list: "1.2 MiB of 4.8 MiB (25%)", and "held back 3.2 s by a
    bandwidth budget" when it was. The percentage rounds down, so 100% means every byte has
    arrived."""
    if not total:
        text = f"{size_text(done)} (size unknown)"
    else:
        text = f"{size_text(done)} of {size_text(total)} ({100 * min(done, total) // total}%)"
    return f"{text}, held back {held_s:.1f} s by a bandwidth budget" if held_s else text


class Progress:
    """Reports PROGRESS at most every `interval` seconds: to the result backend for pollers, and
    as a task-progress event for Flower (update_state alone is invisible there)."""

    def __init__(self, task: Task, interval: float) -> None:
        self.task, self.interval = task, interval
        self.next = time.monotonic() + interval

    def __call__(self, done: int, total: int | None, held_s: float = 0.0) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.interval
        # `throttled_s` only once a bandwidth budget held the download back: the figures of a
        # download without budgets stay as they were.
        held = {"throttled_s": round(held_s, 3)} if held_s else {}
        try:
            self.task.update_state(state="PROGRESS", meta={"bytes": done, "total": total, **held})
            # `result` is the one field Flower keeps and shows (the task list's Result column,
            # the task page, /api/task/info): JSON text that leads with a line for people and
            # keeps the figures for machines reading Flower's API.
            line = {"progress": progress_text(done, total, held_s), "bytes": done,
                    "total": total, **held}  # fmt: skip
            self.task.send_event("task-progress", bytes=done, total=total, result=json.dumps(line),
                                 **held)  # fmt: skip
        except REDIS_ERRORS as exc:
            # Progress is a courtesy: a Redis outage must not fail the download itself.
            log.warning("progress not reported (%s); the download goes on", exc)
