"""The result backend: Celery's Redis backend, made to wait out a Redis outage for final states.

Celery stores a task's result with an unguarded Redis read first (`_store_result` reads the
current state), so a download finishing while Redis is away would end FAILURE with its file on
disk. Here a final state (SUCCESS, FAILURE, RETRY, REVOKED) is retried with backoff for up to
DOWNLOAD_RESULT_OUTAGE seconds, but only off the worker's main loop: a prefork child or a pool
thread may wait, the main process must keep acking, heartbeating and sending events. STARTED and
PROGRESS are courtesies: when Redis is away they are skipped, never waited for.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from billiard.process import current_process
from celery import states
from celery.backends.redis import RedisBackend

from tasks import callback

log = logging.getLogger(__name__)
_WAITED_FOR = frozenset({*states.READY_STATES, states.RETRY})


class DurableRedisBackend(RedisBackend):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage_s = float(self.app.conf.get("download_result_outage") or 0)

    def store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        stored = self._store(task_id, result, state, traceback, request, **kwargs)
        if state in states.READY_STATES:
            self._call_back(task_id, state, result, request)
        return stored

    def _call_back(self, task_id: str, state: str, result: Any, request: Any) -> None:
        """Queue the download's completion callback, if it asked for one: after its final state
        is stored and before its message is acknowledged (worker/ calls this in the process
        that stores, the child or the main process)."""
        try:
            callback.enqueue(self.app, task_id, state, result, request)
        except Exception:
            log.exception("callback of %s not queued", task_id)

    def _store(
        self, task_id: str, result: Any, state: str, traceback: Any, request: Any, **kwargs: Any
    ) -> Any:
        store = super().store_result
        if state not in _WAITED_FOR:
            try:
                return store(task_id, result, state, traceback, request, **kwargs)
            except self.connection_errors as exc:
                log.warning("state %s of %s not stored (%s); going on", state, task_id, exc)
                return result
        if not _off_main_loop():
            return store(task_id, result, state, traceback, request, **kwargs)
        deadline = time.monotonic() + self.outage_s
        delay = 0.1
        while True:
            try:
                return store(task_id, result, state, traceback, request, **kwargs)
            except self.connection_errors as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.warning("cannot store %s of %s yet (%s); retrying", state, task_id, exc)
                time.sleep(delay)
                delay = min(2 * delay, 2.0)


def _off_main_loop() -> bool:
    """True in a prefork child or a pool thread; False where Celery's main loop runs."""
    return current_process().name != "MainProcess" or (
        threading.current_thread() is not threading.main_thread()
    )
