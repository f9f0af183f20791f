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


def progress_text(done: int, total: int | None) -> str:
    """One line for Flower's task list: "1.2 MiB of 4.8 MiB (25%)". The percentage rounds down,
    so 100% means every byte has arrived."""
    if not total:
        return f"{size_text(done)} (size unknown)"
    return f"{size_text(done)} of {size_text(total)} ({100 * min(done, total) // total}%)"


class Progress:
    """Reports PROGRESS at most every `interval` seconds: to the result backend for pollers, and
    as a task-progress event for Flower (update_state alone is invisible there)."""

    def __init__(self, task: Task, interval: float) -> None:
        self.task, self.interval = task, interval
        self.next = time.monotonic() + interval

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + self.interval
        try:
            self.task.update_state(state="PROGRESS", meta={"bytes": done, "total": total})
            # `result` is the one field Flower keeps and shows (the task list's Result column,
            # the task page, /api/task/info): JSON text that leads with a line for people and
            # keeps the figures for machines reading Flower's API.
            line = {"progress": progress_text(done, total), "bytes": done, "total": total}
            self.task.send_event("task-progress", bytes=done, total=total, result=json.dumps(line))
        except REDIS_ERRORS as exc:
            # Progress is a courtesy: a Redis outage must not fail the download itself.
            log.warning("progress not reported (%s); the download goes on", exc)
