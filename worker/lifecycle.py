"""The per-process resources: one requests.Session per prefork child, made after fork in
`worker_process_init` and closed in `worker_process_shutdown`; one per thread in pools without
children (threads, solo). Never one made before fork: children would share its sockets and TLS
state (requests#4323, urllib3#850)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import requests
from celery.signals import worker_process_init, worker_process_shutdown, worker_ready

from tasks.http import new_session
from tasks.storage import sweep_partials
from worker.celery_app import settings

log = logging.getLogger(__name__)
_process: dict[str, Any] = {"session": None, "pid": None}
_threads = threading.local()


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
def sweep_old_partials(**_: Any) -> None:
    removed = sweep_partials(settings.download_dir, settings.partial_max_age)
    if removed:
        log.info("removed %d partial downloads older than %ss", removed, settings.partial_max_age)


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
