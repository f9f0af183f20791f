"""A deliberately leaking task, loaded only into a benchmark worker with `--include bench.leaky`:
`bench.leaky` downloads like `downloads.fetch` and then keeps LEAK_BYTES per download in a
module-level list (a cache that never evicts), to show what recycling children bounds."""

from __future__ import annotations

import os
from typing import Any

from celery import Task

from bench.tasks import fetch_with
from tasks.fetch import FetchTask
from worker import lifecycle
from worker.celery_app import app

LEAK_BYTES = 64 * 1024
_KEPT: list[bytes] = []


@app.task(name="bench.leaky", bind=True, base=FetchTask, typing=False)
def leaky(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    result = fetch_with(self, lifecycle.session(), args, kwargs)
    _KEPT.append(os.urandom(LEAK_BYTES))  # random bytes: every page is really touched
    return result
