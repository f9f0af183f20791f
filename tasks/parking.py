"""A download parked while it waits for a slot at its origin (tasks/core/origins.py): its message
goes to Redis and its worker process is freed; a released slot or the sweep publishes it again,
with the time it waited added to its journey. Parking costs no fault retry and no attempt."""

from __future__ import annotations

import json
import time
from typing import Any

from celery import Task

from download_client.contract import TASK_NAME
from tasks import runtime
from tasks.retries import publish_policy


def message(task: Task) -> str:
    """What publishing the task again needs, as JSON."""
    req = task.request
    delivery = req.delivery_info or {}
    return json.dumps(
        {
            "id": req.id,
            "args": list(req.args or ()),
            "kwargs": dict(req.kwargs or {}),
            "queue": delivery.get("routing_key"),
            "retries": req.retries or 0,
            "headers": {k: v for k, v in (req.headers or {}).items() if k.startswith("download_")},
            "parked_at": time.time(),
        }
    )


def publish(app: Any, messages: list[str]) -> None:
    """Publish woken messages again; each carries the seconds it waited."""
    for raw in messages:
        m = json.loads(raw)
        waited = float(m["headers"].get("download_waited_s", 0.0))
        waited += max(0.0, time.time() - float(m["parked_at"]))
        app.send_task(
            TASK_NAME,
            args=m["args"],
            kwargs=m["kwargs"],
            task_id=m["id"],
            queue=m["queue"],
            retries=m["retries"],
            headers={**m["headers"], "download_waited_s": round(waited, 3)},
            retry=True,
            retry_policy=publish_policy(runtime.configured()),
        )
