"""The result backend: Celery's Redis backend, made to wait out a Redis outage for final states.

Celery stores a task's result with an unguarded Redis read first (it reads the current state
before it writes), so a download finishing while Redis is away would end FAILURE with its file on
disk. Here a final state (SUCCESS, FAILURE, RETRY, REVOKED) is retried with backoff for up to
DOWNLOAD_RESULT_OUTAGE seconds, but only off the worker's main loop: a prefork child or a pool
thread may wait, the main process must keep acking, heartbeating and sending events. STARTED and
PROGRESS are courtesies: when Redis is away they are skipped, never waited for.

Celery's read-then-write (a stored SUCCESS is never overwritten: a lost worker's late copy must
not undo a finished task) is done here as one script: one round trip for each state stored,
where Celery takes two. A task may also put its STARTED on a pipeline of its own
(`queue_state`) and have writes ride with its final state (`ride`): a download then costs the
worker process two round trips in all, as a task that does nothing does.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol

from billiard.process import current_process
from celery import states
from celery.backends.redis import RedisBackend
from celery.exceptions import BackendStoreError

from tasks import callback
from worker.celery_internals import result_meta

log = logging.getLogger(__name__)
# Redis's own limit on a string value (512 MB, "proto-max-bulk-len"), which Celery's Redis
# backend checks too: refused here before the script would fail on it.
MAX_VALUE_BYTES = 512 * 1024 * 1024
_WAITED_FOR = frozenset({*states.READY_STATES, states.RETRY})
# KEYS: the task's result key. ARGV: the encoded meta (JSON), its expiry in seconds (0: none).
_STORE_UNLESS_SUCCEEDED = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, meta = pcall(cjson.decode, cur)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then return 0 end
end
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class Rider(Protocol):
    """Writes that go with a task's final state, in the same round trip (a download's claim,
    origin slot and byte count); `done` gets their answers."""

    def queue(self, pipe: Any) -> None: ...

    def done(self, answers: list[Any]) -> None: ...


class DurableRedisBackend(RedisBackend):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outage_s = float(self.app.conf.get("download_result_outage") or 0)
        self.riders: dict[str, Rider] = {}

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

    def queue_state(self, pipe: Any, task_id: str, result: Any, state: str, request: Any) -> bool:
        """Queue the storing of a state on a task's own pipeline (one round trip for both);
        False when it cannot be queued (the task stores it the usual way)."""
        if self.serializer != "json":
            return False
        pipe.eval(_STORE_UNLESS_SUCCEEDED, 1, *self._encoded(task_id, result, state, None, request))
        return True

    def ride(self, task_id: str, rider: Rider) -> None:
        """Have `rider`'s writes go with the task's final state, in its round trip."""
        self.riders[task_id] = rider

    def _write(
        self, task_id: str, result: Any, state: str, traceback: Any, request: Any, **kwargs: Any
    ) -> Any:
        """Store one state, once: Celery's encoding, then the script (Celery's own read and
        write when the serializer is not JSON, which the script cannot read)."""
        if self.serializer != "json":
            return super().store_result(task_id, result, state, traceback, request, **kwargs)
        result = self.encode_result(result, state)
        stored = self._encoded(task_id, result, state, traceback, request)
        rider = self.riders.get(task_id) if state in states.READY_STATES else None
        # No retry here (Celery wraps its own write in one): a courtesy state is skipped at
        # once when Redis is away, and final states are retried by `_store`, off the main loop.
        self._store_unless_succeeded(*stored, rider)
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

    def _store_unless_succeeded(
        self, key: str, value: str, expires: int, rider: Rider | None = None
    ) -> None:
        if rider is None:
            self.client.eval(_STORE_UNLESS_SUCCEEDED, 1, key, value, expires)
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.eval(_STORE_UNLESS_SUCCEEDED, 1, key, value, expires)
        rider.queue(pipe)
        rider.done(pipe.execute()[1:])

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
