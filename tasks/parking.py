"""A download parked in Redis, its worker process freed: while it waits for a slot at its origin
(tasks/core/origins.py; a released slot or the sweep publishes it again, with the time it waited
added to its journey, and it costs no fault retry and no attempt), or, with a deadline, while it
waits for its next attempt after a fault (the sweep publishes it when that is due)."""

from __future__ import annotations

import json
import time
from typing import Any

from celery import Task

from download_client.contract import TASK_NAME
from download_client.groups import DEFAULT_GROUP
from download_client.lanes import WOKEN, home_queue, lane, lane_of
from tasks import runtime
from tasks.retries import publish_policy

# The header of a delivery woken for a slot: the scope that keeps the slot for it.
WOKEN_FOR = "download_woken_for"


def message(
    task: Task,
    headers: dict[str, Any] | None = None,
    retry: bool = False,
    scope: str = "",
    need: int | None = None,
) -> str:
    """What publishing the task again needs, as JSON: as it came (a wait for a slot), or as its
    next attempt after a fault (`retry`: one more Celery retry, and these journey `headers`).
    `need`: what it waits for counts more than one slot (a disk reservation's bytes)."""
    req = task.request
    delivery = req.delivery_info or {}
    seen = req.headers if headers is None else headers
    group = str((req.kwargs or {}).get("group") or DEFAULT_GROUP)
    extra = {} if need is None else {"need": need}
    return json.dumps(
        {
            **extra,
            "id": req.id,
            "args": list(req.args or ()),
            "kwargs": dict(req.kwargs or {}),
            "queue": home_queue(delivery.get("routing_key") or ""),
            "lane": lane_of(delivery.get("routing_key") or "") or WOKEN,
            "retries": (req.retries or 0) + (1 if retry else 0),
            "headers": {k: v for k, v in (seen or {}).items() if k.startswith("download_")},
            "parked_at": time.time(),
            "retry": retry,
            # Its group's list and share where it waits for a slot (tasks/core/ledger.py).
            "group": group,
            "weight": runtime.configured().group_weight(group),
            # Where it waits for a slot: woken there, its run gives that slot back if it does
            # not take it (WOKEN_FOR).
            "scope": scope,
        }
    )


def publish(app: Any, messages: list[str]) -> None:
    """Publish woken messages again, to their queue's woken lane (download_client/lanes.py), or
    its urgent lane for an urgent one: they have waited their turn once. Each waiting for a
    slot carries the seconds it waited."""
    for raw in messages:
        publish_one(app, raw)


def publish_one(app: Any, raw: str) -> None:
    m = json.loads(raw)
    headers = m["headers"]
    if not m.get("retry"):  # a retry's wait is its backoff, counted when it was chosen
        waited = float(headers.get("download_waited_s", 0.0))
        waited += max(0.0, time.time() - float(m["parked_at"]))
        headers = {**headers, "download_waited_s": round(waited, 3)}
        if m.get("scope"):
            headers[WOKEN_FOR] = m["scope"]
    app.send_task(
        TASK_NAME,
        args=m["args"],
        kwargs=m["kwargs"],
        task_id=m["id"],
        queue=lane(m["queue"] or app.conf.task_default_queue, m.get("lane") or WOKEN),
        retries=m["retries"],
        headers=headers,
        retry=True,
        retry_policy=publish_policy(runtime.configured()),
    )
