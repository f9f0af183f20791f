"""A warm shutdown (SIGTERM) waits for running downloads, but only DOWNLOAD_SHUTDOWN_GRACE seconds
(set it below the supervisor's grace period). Then their children are killed and their messages
(late acks: not yet acknowledged) go straight back to the queue, where another worker resumes
them from their partials. Left to the supervisor's SIGKILL instead, the whole worker would die
and Redis would hand the messages out again only after the visibility timeout.

These kills are not deaths: each one's delivery is uncounted first, so three deploys do not turn
a download into a poison message (DOWNLOAD_MAX_DELIVERIES)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutting_down

from download_client.settings import Settings
from tasks import deliveries
from worker.backend import ledger_of
from worker.celery_internals import running_requests

log = logging.getLogger(__name__)


def connect(app: Celery, settings: Settings) -> None:
    consumer: dict[str, Any] = {}

    def keep(sender: Any = None, **_: Any) -> None:
        consumer["it"] = sender

    def bound(how: str = "", **_: Any) -> None:
        if how == "Warm" and "it" in consumer:
            later = threading.Timer(settings.shutdown_grace, requeue_running, (app, settings))
            later.daemon = True
            later.start()

    worker_ready.connect(keep, weak=False, dispatch_uid="downloads-shutdown-consumer")
    worker_shutting_down.connect(bound, weak=False, dispatch_uid="downloads-shutdown-bound")


def requeue_running(app: Celery, settings: Settings) -> None:
    running = [r for r in running_requests() if r.worker_pid and not r.acknowledged]
    if not running:
        return
    log.warning(
        "shutdown grace (%ss) over: requeueing %d running downloads",
        settings.shutdown_grace,
        len(running),
    )
    runs = [(r.id, int(r.request_dict.get("retries") or 0)) for r in running]
    deliveries.uncount(ledger_of(app), runs)
    for request in running:
        # Not pool.terminate_job: the pool would record the task as REVOKED ("terminated").
        with contextlib.suppress(OSError):
            os.kill(request.worker_pid, signal.SIGKILL)
        # Put the message back now: a pool that is stopping does not report the lost child,
        # so task_reject_on_worker_lost would never get to requeue it.
        request.reject(requeue=True)
