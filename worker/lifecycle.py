"""Per-process resources in prefork children: the runtime (settings, one requests.Session,
limits, root; tasks/runtime.py) is made right after fork in `worker_process_init` and closed in
`worker_process_shutdown`. The init handler must finish within `worker_proc_alive_timeout` (4 s):
making a Session opens no connection."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from download_client.settings import Settings
from tasks import runtime


def connect(app: Celery, settings: Settings) -> None:
    worker_process_init.connect(_open, weak=False, dispatch_uid="downloads-runtime-open")
    worker_process_shutdown.connect(_close, weak=False, dispatch_uid="downloads-runtime-close")


def _open(**_: Any) -> None:
    runtime.open_for_process()


def _close(**_: Any) -> None:
    runtime.close_for_process()
