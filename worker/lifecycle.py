"""Per-process resources in prefork children: the runtime (settings, one requests.Session,
limits, root; tasks/runtime.py) is made right after fork in `worker_process_init` and closed in
`worker_process_shutdown`. The init handler must finish within `worker_proc_alive_timeout` (4 s):
making a Session opens no connection."""

from __future__ import annotations

import gc
import os
import sys
from typing import Any

from celery import Celery, bootsteps, states
from celery.signals import task_postrun, worker_init, worker_process_init, worker_process_shutdown

from download_client.settings import Settings
from tasks import callback, runtime
from tasks.core.egress import Egress


def connect(app: Celery, settings: Settings) -> None:
    if not _freezing:
        _freezing.append(True)
        os.register_at_fork(before=_freeze_before_fork)
    worker_init.connect(_parse_before_fork, weak=False, dispatch_uid="downloads-parse-before-fork")
    worker_process_init.connect(_open, weak=False, dispatch_uid="downloads-runtime-open")
    worker_process_shutdown.connect(_close, weak=False, dispatch_uid="downloads-runtime-close")
    task_postrun.connect(_collect_cycles, weak=False, dispatch_uid="downloads-collect-cycles")

    class EgressCheck(bootsteps.Step):  # type: ignore[misc]
        """A CA bundle or client certificate that cannot be loaded stops the worker as it
        starts, naming the variable, instead of failing every child after fork (a signal
        handler's error is only logged). Flower builds the same app and never loads them."""

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            Egress.from_settings(settings).ssl_context()
            super().__init__(parent, **kwargs)

    app.steps["worker"].add(EgressCheck)


_freezing: list[bool] = []  # the fork hook is registered once, however many apps are made


def _freeze_before_fork() -> None:
    """Keep the parent's objects out of every later garbage collection, in the parent and in the
    child, so neither writes to the pages they share after fork.

    A collection writes to the header of every object it scans. When the parent scans the
    objects it had at fork, the kernel copies each page for the parent and the child's copy
    becomes its own: measured at 8 slots, an idle child went from 30 to 10 MiB private and the
    whole worker from 35 to 18 MiB PSS a slot. So the freeze is never undone (unfreezing after
    fork cost all of it). Collecting first frees the garbage of the moment; what is frozen alive
    and dies later stays allocated, bounded by what the parent holds at each fork (start and
    each recycle). The collection scans only objects made since the last freeze."""
    gc.collect()
    gc.freeze()


# Runs that end by raising: a retry (parked or not), a park or a wait (Ignore), a failure.
RAISED = frozenset({states.RETRY, states.IGNORED, states.FAILURE})


def _collect_cycles(state: str | None = None, **_: Any) -> None:
    """After a run that ended by raising, free the reference cycles the runs before it left.

    Celery's tracer keeps the exception in a local of its own frame (`I`, `R`), and the
    exception's traceback holds that frame (celery/app/trace.py, `build_tracer`; its
    `traceback_clear` cannot clear a frame still running), so each such run leaves a cycle:
    the frames of the fault (requests', urllib3's), the task's locals and billiard's copy of
    the traceback (`ExceptionInfo`, which keeps every frame's code positions), a few hundred
    KiB. Only a full collection frees it, and with the parent's objects frozen at fork the
    child's thresholds allow one only after tens of MiB: a child's memory grew by 57 MiB over
    about 250 retries of downloads waiting on a dead origin. The freeze also makes the
    collection cheap: a child scans only the objects it made since (about 1,500)."""
    if state in RAISED:
        gc.collect()


PRCTL = "int prctl (int __option, ...);"


def _parse_before_fork(**_: Any) -> None:
    """Parse, in the main process, the one C declaration every child parses as it starts.

    billiard sets each new child's parent-death signal through cffi whenever cffi is imported
    (billiard/util.py, `set_pdeathsig`): `cffi.FFI().cdef(PRCTL)`. The first cdef in a process
    imports pycparser and builds its parser, which cffi then keeps (cffi/cparser.py,
    `_get_parser`); done after fork, each child built its own, with its imports, in pages of its
    own. Done here first, before the pool forks, children find the parser made and share it."""
    if "cffi" not in sys.modules:
        return  # billiard then uses ctypes, which parses nothing
    import cffi  # type: ignore[import-untyped]  # no stubs (tests/test_memory.py)

    cffi.FFI().cdef(PRCTL)


def _open(**_: Any) -> None:
    runtime.open_for_process()


def _close(**_: Any) -> None:
    runtime.close_for_process()
    callback.close_session()
