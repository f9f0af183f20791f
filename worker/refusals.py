"""Messages the worker refuses (another serializer, a body that cannot be decoded or is not a task
message, a task nobody here runs, a shape the gate in tasks/messages.py turns away).

Celery logs such a message's body (cut to 1 KiB) and all its headers, which hold the caller's
header values, URL tokens and the producer's own argsrepr/kwargsrepr. This consumer logs one
line instead: the id, the task name, the content type and why, none of them read from the body.
Its producer learns why at once: a FAILURE is stored under the message's id, only when no state
exists there yet (a refused copy never overwrites a real task's state), and by a thread of its
own, so a slow or absent Redis never holds up the worker's main loop."""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

from celery import Celery, signals, states
from celery.worker.consumer.consumer import Consumer as CeleryConsumer

from download_client.errors import PermanentError
from tasks.core.ledger import State
from worker.backend import ledger_of
from worker.celery_internals import result_meta

log = logging.getLogger(__name__)
MAX_PENDING = 1000  # refusals waiting to be stored; past this they are only logged


class Consumer(CeleryConsumer):  # type: ignore[misc]
    """Celery's consumer, with refusals that log no message content and store a FAILURE."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refusals = Refusals(self.app)

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        self.refusals.refuse(message, None, f"its body cannot be decoded ({type(exc).__name__})")
        message.ack()

    def on_unknown_message(self, body: Any, message: Any) -> None:
        self.refusals.refuse(message, body, "it is not a task message")
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=None)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        name = _field(message, body, "task")
        self.refusals.refuse(message, body, f"no task named {_shown(name)} runs here")
        message.reject_log_error(log, self.connection_errors)
        signals.task_unknown.send(
            sender=self, message=message, exc=exc, name=name, id=_task_id(message, body)
        )

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        # The gate's reasons and Celery's own (ContentDisallowed, a bad args/kwargs type) name
        # the problem, never a value from the message.
        self.refusals.refuse(message, body, str(exc)[:300])
        message.reject_log_error(log, self.connection_errors)
        signals.task_rejected.send(sender=self, message=message, exc=exc)


class Refusals:
    """Logs each refusal in one line and stores its FAILURE from a thread of its own."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.pending: queue.Queue[tuple[str, str]] = queue.Queue(MAX_PENDING)
        threading.Thread(target=self._store_loop, name="refusals", daemon=True).start()

    def refuse(self, message: Any, body: Any, reason: str) -> None:
        task_id = _task_id(message, body)
        log.error(
            "refused message %s (task %s, content type %s): %s; discarded",
            task_id or "without an id",
            _shown(_field(message, body, "task")),
            _shown(getattr(message, "content_type", None)),
            reason,
        )
        if task_id is not None:
            try:
                self.pending.put_nowait((task_id, reason))
            except queue.Full:
                log.warning("refusal of %s not stored: too many waiting", task_id)

    def _store_loop(self) -> None:
        while True:
            task_id, reason = self.pending.get()
            try:
                self.store(task_id, reason)
            except Exception as exc:  # a refusal's state is a courtesy: never stop the thread
                log.warning("refusal of %s not stored (%s)", task_id, type(exc).__name__)

    def store(self, task_id: str, reason: str) -> bool:
        """FAILURE under `task_id` unless a state is there already; True if stored."""
        backend = self.app.backend
        error = PermanentError(f"the worker refused the message: {reason}")
        meta = result_meta(
            backend, backend.encode_result(error, states.FAILURE), states.FAILURE, None, None
        )
        meta["task_id"] = task_id
        key = backend.get_key_for_task(task_id)
        expires = int(backend.expires or 0)
        # Only where no state exists, telling subscribers (AsyncResult.get) in the same step.
        state = State(key, backend.encode(meta), expires)
        return ledger_of(self.app).store_state(state, only_new=True)


def _field(message: Any, body: Any, name: str) -> Any:
    """A header of a protocol 2 message, or a field of a protocol 1 body already decoded."""
    headers = getattr(message, "headers", None)
    if isinstance(headers, dict) and name in headers:
        return headers[name]
    if isinstance(body, dict):
        return body.get(name)
    return None


def _task_id(message: Any, body: Any) -> str | None:
    """The id a producer waits on: the task id, else the correlation id (the same in Celery's
    and celery-node's messages), when it looks like an id at all."""
    properties = getattr(message, "properties", None) or {}
    for value in (_field(message, body, "id"), properties.get("correlation_id")):
        if _looks_like_id(value):
            return str(value)
    return None


def _looks_like_id(value: Any) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= 255
        and value.isprintable()
        and not any(c.isspace() for c in value)
    )


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return repr(value[:100])
    return f"<{type(value).__name__}>"
