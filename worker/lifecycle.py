"""Per-process resources in prefork children: the runtime (settings, one requests.Session,
limits, root; tasks/runtime.py) is made right after fork in `worker_process_init` and closed in
`worker_process_shutdown`. The init handler must finish within `worker_proc_alive_timeout` (4 s):
making a Session opens no connection."""

from __future__ import annotations

from typing import Any

from celery import Celery, bootsteps
from celery.signals import worker_process_init, worker_process_shutdown

from download_client.settings import Settings
from tasks import runtime
from tasks.core.egress import Egress


def connect(app: Celery, settings: Settings) -> None:
    worker_process_init.connect(_open, weak=False, dispatch_uid="downloads-runtime-open")
    worker_process_shutdown.connect(_close, weak=False, dispatch_uid="downloads-runtime-close")

    class EgressCheck(bootsteps.Step):  # type: ignore[misc]
        """A CA bundle or client certificate that cannot be loaded stops the worker as it
        starts, naming the variable, instead of failing every child after fork (a signal
        handler's error is only logged). Flower builds the same app and never loads them."""

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            Egress.from_settings(settings).ssl_context()
            super().__init__(parent, **kwargs)

    app.steps["worker"].add(EgressCheck)


def _open(**_: Any) -> None:
    runtime.open_for_process()


def _close(**_: Any) -> None:
    runtime.close_for_process()
