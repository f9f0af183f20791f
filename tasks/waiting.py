"""What a download says while it waits without a worker process, and when it really runs.

A wait is the state WAITING with `{"reason": "origin", "since", "origin"}` (parked for a slot at
its origin), `{"reason": "group", "since", "group"}` (for a slot of its group's cap), `{"reason":
"disk", "since", "volume", "need"}` (for room on its volume: `need` bytes) or `{"reason":
"destination", "since", "dest"}` (another download is writing its destination): stored in the
result backend for pollers and sent as a `task-waiting` event for Flower. A run that really
begins (its first request is about to go out) says so with PROGRESS at 0 bytes, in the backend
and as a `task-progress` event, when it comes back from a wait: the worker's main process does
not send `task-started` for such a run (tasks/messages.py), since it cannot know whether the run
will download or wait again. See docs/contract.md."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery import Task

from download_client.contract import (
    WAITING_DESTINATION,
    WAITING_DISK,
    WAITING_GROUP,
    WAITING_ORIGIN,
)
from tasks.deliveries import REDIS_ERRORS
from tasks.progress import progress_text

log = logging.getLogger(__name__)


def for_origin(origin: str) -> dict[str, Any]:
    return {"reason": WAITING_ORIGIN, "since": round(time.time(), 3), "origin": origin}


def for_group(group: str) -> dict[str, Any]:
    return {"reason": WAITING_GROUP, "since": round(time.time(), 3), "group": group}


def for_disk(volume: str, need: int) -> dict[str, Any]:
    return {"reason": WAITING_DISK, "since": round(time.time(), 3), "volume": volume,
            "need": need}  # fmt: skip


def for_destination(dest: str) -> dict[str, Any]:
    return {"reason": WAITING_DESTINATION, "since": round(time.time(), 3), "dest": dest}


def text(meta: dict[str, Any]) -> str:
    """One line for people: `waiting for a slot at https://files.example:443`."""
    if meta.get("reason") == WAITING_ORIGIN:
        return f"waiting for a slot at {meta.get('origin')}"
    if meta.get("reason") == WAITING_GROUP:
        return f"waiting for a slot of group {meta.get('group')} (DOWNLOAD_GROUP_LIMITS)"
    if meta.get("reason") == WAITING_DISK:
        return (f"waiting for {_mib(meta.get('need'))} of room on volume {meta.get('volume')} "
                "(DOWNLOAD_DISK_MARGIN)")  # fmt: skip
    return f"waiting for {meta.get('dest')}, which another download is writing"


def _waiting_for(meta: dict[str, Any]) -> Any:
    return meta.get("origin") or meta.get("group") or meta.get("volume") or meta.get("dest")


def _mib(n: Any) -> str:
    return f"{float(n or 0) / 2**20:.1f} MiB"


def announce(task: Task, meta: dict[str, Any]) -> None:
    """The `task-waiting` event: `reason`, `since`, `waiting_for` (the origin or the destination:
    an event monitor's task already has an `origin`, the worker that ran it) and `result` (the
    field Flower shows in its list and on the task's page): JSON text that leads with a line
    for people, then the meta as stored."""
    fields = {
        "reason": meta.get("reason"),
        "since": meta.get("since"),
        "waiting_for": _waiting_for(meta),
        "result": json.dumps({"waiting": text(meta), **meta}),
    }
    try:
        task.send_event("task-waiting", **fields)
    except REDIS_ERRORS as exc:
        log.warning("waiting not announced (%s); the download waits all the same", exc)


def running(task: Task) -> None:
    """A run after a wait really begins: PROGRESS at 0 bytes in the result backend and as an
    event (with `started`, the time Flower shows as the task's start)."""
    try:
        task.update_state(state="PROGRESS", meta={"bytes": 0, "total": None})
        line = {"progress": progress_text(0, None), "bytes": 0, "total": None}
        task.send_event(
            "task-progress", bytes=0, total=None, started=time.time(), result=json.dumps(line)
        )
    except REDIS_ERRORS as exc:
        log.warning("start not reported (%s); the download goes on", exc)
