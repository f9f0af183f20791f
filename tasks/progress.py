"""PROGRESS reports of a running download."""

from __future__ import annotations

import json
import logging
import time

from celery import Task

from tasks.deliveries import REDIS_ERRORS

log = logging.getLogger(__name__)


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
        meta = {"bytes": done, "total": total}
        try:
            self.task.update_state(state="PROGRESS", meta=meta)
            # Numbers for machines reading events; `result` is the one field Flower keeps and
            # shows (task page, /api/task/info): the same figures as JSON text.
            self.task.send_event("task-progress", bytes=done, total=total, result=json.dumps(meta))
        except REDIS_ERRORS as exc:
            # Progress is a courtesy: a Redis outage must not fail the download itself.
            log.warning("progress not reported (%s); the download goes on", exc)
