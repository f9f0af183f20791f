"""The per-process resources: one requests.Session per prefork child, made after fork in
`worker_process_init` and closed in `worker_process_shutdown`; one per thread in pools without
children (threads, solo). Never one made before fork: children would share its sockets and TLS
state (requests#4323, urllib3#850)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import Any

import requests
from celery.signals import (
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
    worker_shutting_down,
)
from celery.worker import state

from tasks.http import new_session
from tasks.storage import sweep_partials
from worker.celery_app import settings

log = logging.getLogger(__name__)
_process: dict[str, Any] = {"session": None, "pid": None}
_threads = threading.local()
_sweeping = threading.Event()  # set: the sweeper stops


@worker_process_init.connect
def open_process_session(**_: Any) -> None:
    _process["session"] = new_session(settings.allow_private)
    _process["pid"] = os.getpid()


@worker_process_shutdown.connect
def close_process_session(**_: Any) -> None:
    session = _process["session"]
    _process["session"] = None
    if session is not None:
        session.close()


@worker_ready.connect
def start_sweeping(**_: Any) -> None:
    """Sweep .partial/ now and every DOWNLOAD_PARTIAL_SWEEP_INTERVAL seconds, from a thread of
    the main process: children come and go, and a worker may run for months."""
    _sweeping.clear()
    threading.Thread(target=_sweep_until_shutdown, name="partial-sweep", daemon=True).start()


@worker_shutdown.connect
def stop_sweeping(**_: Any) -> None:
    _sweeping.set()


def _sweep_until_shutdown() -> None:
    while True:
        sweep_once()
        if _sweeping.wait(settings.partial_sweep_interval):
            return


def sweep_once() -> None:
    try:
        removed = sweep_partials(settings.download_dir, settings.partial_max_age)
    except Exception:  # the sweeper must outlive one bad pass (a file system hiccup)
        log.exception("sweeping %s failed; trying again next time", settings.partial_dir)
        return
    if removed:
        log.info("removed %d abandoned files from %s", removed, settings.partial_dir)


def session() -> requests.Session:
    """The session for the calling process, or for the calling thread in a threads/solo pool."""
    if _process["session"] is not None and _process["pid"] == os.getpid():
        return _process["session"]  # type: ignore[no-any-return]
    own: requests.Session | None = getattr(_threads, "session", None)
    if own is None or getattr(_threads, "pid", None) != os.getpid():
        own = _threads.session = new_session(settings.allow_private)
        _threads.pid = os.getpid()
    return own


def session_created_in() -> int | None:
    """The pid that made this process's session (for tests: it must be the child's own)."""
    return _process["pid"]  # type: ignore[no-any-return]


@worker_ready.connect
def keep_consumer(sender: Any = None, **_: Any) -> None:
    _process["consumer"] = sender


@worker_shutting_down.connect
def bound_the_shutdown(how: str = "", **_: Any) -> None:
    """A warm shutdown waits for running downloads, but only DOWNLOAD_SHUTDOWN_GRACE seconds
    (set it below the supervisor's grace period): then their children are killed and their
    messages (late acks: not yet acknowledged) go straight back to the queue, where another
    worker resumes them from their partials. Left to the supervisor's SIGKILL instead, the whole
    worker dies and Redis hands the messages out again only after the visibility timeout.
    These kills are not deaths: each one's delivery is uncounted first, so three deploys do not
    turn a download into a poison message."""
    if how == "Warm":
        timer = threading.Timer(settings.shutdown_grace, _requeue_running)
        timer.daemon = True
        timer.start()


def _requeue_running() -> None:
    consumer = _process.get("consumer")
    running = [r for r in list(state.active_requests) if r.worker_pid and not r.acknowledged]
    if consumer is None or not running:
        return
    log.warning(
        "shutdown grace (%ss) over: requeueing %d running downloads",
        settings.shutdown_grace,
        len(running),
    )
    _uncount_deliveries(consumer.app, running)
    for request in running:
        # Not pool.terminate_job: the pool would record the task as REVOKED ("terminated").
        with contextlib.suppress(OSError):
            os.kill(request.worker_pid, signal.SIGKILL)
        # Put the message back now: a pool that is stopping does not report the lost child,
        # so task_reject_on_worker_lost would never get to requeue it.
        request.reject(requeue=True)


def _uncount_deliveries(app: Any, running: list[Any]) -> None:
    from tasks.fetch import delivery_key

    try:
        pipe = app.backend.client.pipeline()
        for request in running:
            pipe.decr(delivery_key(request.id, int(request.request_dict.get("retries") or 0)))
        pipe.execute()
    except Exception as exc:  # Redis away: the kill still beats waiting for the visibility timeout
        log.warning("deliveries of requeued downloads not uncounted (%s)", exc)
