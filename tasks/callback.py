"""The `downloads.callback` task: tell a service that its download ended, at least once.

A download that reaches a final state (SUCCESS, FAILURE, REVOKED) with a `callback_url` gets this
task queued on its own queue, before its message is acknowledged: the result backend queues it
right after storing the state (worker/backend.py), in whichever process stores it (a child, or
the main process for a hard time limit or a revoke). It POSTs the signed body
until a 2xx, with backoff, and gives up after DOWNLOAD_CALLBACK_GIVE_UP seconds: then it ends
FAILURE (Flower shows it), logs an error and keeps a record in Redis for the operator."""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import requests
from celery import Task

from download_client import arguments
from download_client.contract import TASK_NAME
from download_client.errors import PermanentError, TransientError
from download_client.lanes import without_delay
from download_client.redact import redact_url
from tasks import runtime
from tasks.core import callbacks
from tasks.core.http import new_session
from tasks.retries import publish_policy, send_again
from tasks.run import backend_of

CALLBACK_TASK = "downloads.callback"
log = logging.getLogger(__name__)
_sessions: dict[int, requests.Session] = {}


class CallbackTask(Task):  # type: ignore[misc]
    name = CALLBACK_TASK
    typing = False
    throws = (PermanentError,)
    max_retries = None  # bounded by DOWNLOAD_CALLBACK_GIVE_UP, not by a count

    def run(self, url: str, text: str, task_id: str, first_at: float) -> dict[str, Any]:
        s = runtime.configured()
        callbacks.check_allowed(url, s.callback_allow)
        try:
            status = callbacks.post(_session(), url, text, s.callback_secret, task_id, 10.0)
        except TransientError as exc:
            tries, elapsed = self.request.retries + 1, time.time() - first_at
            delay = min(s.callback_backoff_max, 2.0**self.request.retries)
            if elapsed + delay <= s.callback_give_up:
                raise send_again(
                    self, exc=exc, countdown=delay, retry_policy=publish_policy(s)
                ) from None
            why = f"gave up after {tries} attempts over {elapsed:.0f} s: {exc}"
            self._record_give_up(url, task_id, why)
            raise PermanentError(f"callback for {task_id} to {redact_url(url)} {why}") from None
        return {"task_id": task_id, "http_status": status, "attempts": self.request.retries + 1}

    def _record_give_up(self, url: str, task_id: str, why: str) -> None:
        log.error("callback for %s to %s %s", task_id, redact_url(url), why)
        record = {"callback_url": redact_url(url), "why": why, "at": time.time()}
        expires = int(runtime.configured().result_expires)
        backend_of(self).ledger.record_given_up(task_id, record, expires)


def close_session() -> None:
    """Close this process's callback session (at the process's exit, beside its runtime)."""
    session = _sessions.pop(os.getpid(), None)
    _sessions.clear()
    if session is not None:
        session.close()


def _session() -> requests.Session:
    """This process's session for callbacks: receivers are internal hosts the allowlist admits,
    so the download session's address rules and proxy do not apply."""
    pid = os.getpid()
    if pid not in _sessions:
        _sessions.clear()
        _sessions[pid] = new_session(allow_private=True)
    return _sessions[pid]


def enqueue(app: Any, task_id: str, state: str, result: Any, request: Any) -> None:
    """Queue the callback of a download that reached `state`, if it asked for one."""
    url = callback_url_of(request)
    if url is None:
        return
    text = callbacks.body(task_id, state, result)
    delivery = getattr(request, "delivery_info", None) or {}
    app.send_task(
        CALLBACK_TASK,
        args=[url, text, task_id, time.time()],
        # Where the download came from (its queue, or a lane: an urgent one's callback is urgent
        # too), without native delayed delivery's prefix.
        queue=without_delay(delivery.get("routing_key") or "") or None,
        retry=True,
        retry_policy=publish_policy(runtime.configured()),
    )


_CALLBACK_AT = arguments.ARGUMENTS.index("callback_url")


def callback_url_of(request: Any) -> str | None:
    """The download's callback_url, from a task context or a worker's request."""
    name = getattr(request, "task_name", None) or getattr(request, "task", None)
    if name != TASK_NAME:
        return None
    try:
        args, kwargs = tuple(request.args or ()), request.kwargs or {}
        if len(args) <= _CALLBACK_AT and "callback_url" not in kwargs:
            return None  # the common case, without checking every argument again
        parsed = arguments.parse(args, kwargs)
    except (PermanentError, TypeError, AttributeError):
        return None
    return parsed.callback_url
