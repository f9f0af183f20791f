"""Bench-only tasks, loaded into a benchmark worker with `--include bench.tasks`; never part of the
production app. Each runs the same steps as `downloads.fetch` (arguments, the delivery count, the
download code, the result) so that only the named difference is measured.

  bench.session_per_download  the anti-pattern: a new requests.Session for every download
  bench.noop                  Celery's own ceiling: same configuration, same arguments, no work
"""

from __future__ import annotations

import time
from typing import Any

import requests
from celery import Task

from tasks import arguments
from tasks.download import download
from tasks.fetch import LIMITS, FetchTask, _count_delivery, _Progress, _result
from tasks.http import new_session
from worker.celery_app import app, settings


def fetch_with(task: Task, session: requests.Session, args: Any, kwargs: Any) -> dict[str, Any]:
    """`downloads.fetch` without its retry mapping, through the given session."""
    started = time.monotonic()
    request = arguments.parse(args, kwargs)
    attempts = _count_delivery(task)
    outcome = download(session, request, settings.download_dir, LIMITS, _Progress(task))
    return _result(task, outcome, request.url, attempts, started)


@app.task(name="bench.session_per_download", bind=True, base=FetchTask, typing=False)
def session_per_download(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    # The mistake as it is usually made: a fresh Session, dropped (not closed) when done.
    return fetch_with(self, new_session(settings.allow_private), args, kwargs)


@app.task(name="bench.noop", typing=False)
def noop(**kwargs: Any) -> dict[str, Any]:
    """Returns its arguments, so the stored result is about the size of a download's."""
    return dict(kwargs)
