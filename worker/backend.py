"""The result backend: Celery's Redis backend, made to wait out a Redis outage for final states.

Celery stores a task's result with an unguarded Redis read first (it reads the current state
before it writes), so a download finishing while Redis is away would end FAILURE with its file on
disk. Here a final state (SUCCESS, FAILURE, RETRY, REVOKED) is retried with backoff for up to
DOWNLOAD_RESULT_OUTAGE seconds, but only off the worker's main loop: a prefork child or a pool
thread may wait, the main process must keep acking, heartbeating and sending events. STARTED and
PROGRESS are courtesies: when Redis is away they are skipped, never waited for.

Celery's read-then-write (a stored SUCCESS is never overwritten: a lost worker's late copy must
not undo a finished task) is done here as one script (the ledger's, tasks/core/ledger.py): one
round trip for each state stored, where Celery takes two. It is the task's `LedgerBackend`
(tasks/run.py): the task encodes its STARTED here to store it in its own first round trip, and
has its last writes ride with its final state (`ride`): a download then costs the worker process
two round trips in all, as a task that does nothing does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from billiard.process import current_process
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

from tasks import callback
from tasks.core.ledger import Ledger, Settle, Settled, State
from worker.celery_internals import result_meta

log = logging.getLogger(__name__)
# Redis's own limit on a string value (512 MB, "proto-max-bulk-len"), which Celery's Redis
# backend checks too: refused here before the script would fail on it.
MAX_VALUE_BYTES = 512 * 1024 * 1024
_WAITED_FOR = frozenset({*states.READY_STATES, states.RETRY})


class DurableRedisBackend(RedisBackend):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage_s = float(self.app.conf.get("download_result_outage") or 0)
        self.riders: dict[str, tuple[Settle, Callable[[Settled], None]]] = {}

    @property
    def ledger(self) -> Ledger:
        """The download's Redis state, on this backend's client (and its connection pool)."""
        return Ledger(self.client)

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

    def state(self, task_id: str, result: Any, state: str, request: Any) -> State:
        """`state` encoded as this backend stores it, for the task to store in its own round
        trip (the ledger's script: a stored SUCCESS stays)."""
        return State(*self._encoded(task_id, result, state, None, request))

    def ride(self, task_id: str, settle: Settle, then: Callable[[Settled], None]) -> None:
        """Have `settle`'s writes go with the task's final state, in its round trip; `then` gets
        what they settled once they are stored."""
        self.riders[task_id] = (settle, then)

    def _write(
        self, task_id: str, result: Any, state: str, traceback: Any, request: Any, **kwargs: Any
    ) -> Any:
        """Store one state, once: Celery's encoding, then the ledger's script, with the writes
        riding on a final state (settings make the serializer JSON, which the script reads)."""
        result = self.encode_result(result, state)
        stored = State(*self._encoded(task_id, result, state, traceback, request))
        rider = self.riders.get(task_id) if state in states.READY_STATES else None
        # No retry here (Celery wraps its own write in one): a courtesy state is skipped at
        # once when Redis is away, and final states are retried by `_store`, off the main loop.
        if rider is None:
            self.ledger.store_state(stored)
        else:
            settle, then = rider
            settled = self.ledger.settle(replace(settle, final=stored))
            self.riders.pop(task_id, None)
            try:
                then(settled)
            except Exception:  # the state is stored: what it woke waits for the sweep
                log.exception("what %s released was not passed on", task_id)
        self.riders.pop(task_id, None)
        return result

    def _encoded(
        self, task_id: str, result: Any, state: str, traceback: Any, request: Any
    ) -> tuple[str, str, int]:
        meta = result_meta(self, result, state, traceback, request)
        meta["task_id"] = task_id.decode() if isinstance(task_id, bytes) else task_id
        value = self.encode(meta)
        if len(value) > MAX_VALUE_BYTES:
            too_large = "value too large for Redis backend"
            raise BackendStoreError(too_large, state=state, task_id=task_id)
        expires = self.failure_expires if state == states.FAILURE else self.expires
        return self.get_key_for_task(task_id), value, int(expires or 0)

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
        store = self._write
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


def ledger_of(app: Any) -> Ledger:
    """The ledger on an app's result backend (always this backend: the settings want a Redis)."""
    backend = app.backend
    if not isinstance(backend, DurableRedisBackend):
        raise TypeError(f"{type(backend).__name__} is not the downloads' Redis backend")
    return backend.ledger
