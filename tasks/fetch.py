"""The `downloads.fetch` task: Celery concerns only (arguments, retries, progress, redelivery
guard, the result). The HTTP and the disk are in `tasks.download`."""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import redis
from celery import Task
from celery.exceptions import InvalidTaskError, SoftTimeLimitExceeded
from celery.signals import task_revoked
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy
from kombu.exceptions import KombuError

from tasks import TASK_NAME, arguments
from tasks.download import Limits, Outcome, download
from tasks.errors import DestinationBusyError, DownloadError, PermanentError, TransientError
from tasks.redact import redact_reprs, redact_url
from tasks.storage import Target
from worker import lifecycle
from worker.celery_app import app, settings

log = logging.getLogger(__name__)
_BROKER_ERRORS = (redis.RedisError, KombuError, OSError)
RESULT_KEYS = (
    "url",
    "final_url",
    "path",
    "size",
    "sha256",
    "content_type",
    "http_status",
    "attempts",
    "resumed_from",
    "skipped",
    "elapsed_s",
    "worker",
)


class RedactedRequest(Request):  # type: ignore[misc]
    """What the worker shows of a task (task-received events, `inspect active`, so Flower) has
    header values and URL tokens masked, whatever the producer put in argsrepr/kwargsrepr. The
    request dict gets the same: the task's context (log records' extra data) is built from it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._argsrepr, self._kwargsrepr = redact_reprs(self._args, self._kwargs)
        self._request_dict["argsrepr"] = self._argsrepr
        self._request_dict["kwargsrepr"] = self._kwargsrepr

    def info(self, safe: bool = False) -> dict[str, Any]:
        return super().info(safe=True)  # type: ignore[no-any-return]


def checked_strategy(task: Task, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy behind a gate. The consumer refuses pickle and the like, but
    passes `application/data` and `application/text` through undecoded, and a body that is not
    `[args, kwargs, embed]` raises inside the strategy: either one stops the whole worker
    ("Unrecoverable error"), and the message, never acked, is restored to stop the next one.
    Here such a message is an InvalidTaskError: logged and discarded."""
    handler = default_strategy(task, app, consumer, **kwargs)

    def gate(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        if message.content_type != "application/json":
            raise InvalidTaskError(
                f"refused a message of content type {message.content_type!r}: only JSON"
            )
        payload = message.payload
        if not (
            isinstance(payload, list | tuple)
            and len(payload) == 3
            and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict)
            and isinstance(payload[2], dict)
        ):
            raise InvalidTaskError("refused a message whose body is not [args, kwargs, embed]")
        return handler(message, body, *args, **kw)

    return gate


class FetchTask(Task):  # type: ignore[misc]
    Request = RedactedRequest
    Strategy = "tasks.fetch:checked_strategy"


def retry_delay(retries: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After, or exponential backoff with full
    jitter; both capped by DOWNLOAD_RETRY_BACKOFF_MAX."""
    cap = settings.retry_backoff_max
    if retry_after is not None:
        return min(retry_after, cap)
    return random.uniform(0, min(cap, settings.retry_backoff * 2**retries))


def _count_delivery(task: Task) -> int:
    """Count this run in Redis; return the runs so far. A message whose child dies every time
    (a poison URL) is redelivered forever by acks_late: it fails after DOWNLOAD_MAX_DELIVERIES."""
    client = getattr(task.backend, "client", None)
    if client is None:
        return task.request.retries + 1  # type: ignore[no-any-return]
    tid = task.request.id
    deliveries = f"downloads:deliveries:{tid}:{task.request.retries}"
    attempts = f"downloads:attempts:{tid}"
    pipe = client.pipeline()
    pipe.incr(deliveries).expire(deliveries, settings.result_expires)
    pipe.incr(attempts).expire(attempts, settings.result_expires)
    try:
        delivered, _, attempt, _ = pipe.execute()
    except _BROKER_ERRORS as exc:
        log.warning("deliveries not counted (%s)", exc)
        return task.request.retries + 1  # type: ignore[no-any-return]
    if delivered > settings.max_deliveries:
        raise PermanentError(
            f"the download was started {delivered - 1} times and its worker process died each "
            "time (killed or out of memory); giving up"
        )
    return int(attempt)


class _Progress:
    """Reports PROGRESS at most every DOWNLOAD_PROGRESS_INTERVAL seconds: to the result backend
    for pollers, and as a task-progress event for Flower (update_state alone is invisible there)."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.next = time.monotonic() + settings.progress_interval

    def __call__(self, done: int, total: int | None) -> None:
        now = time.monotonic()
        if now < self.next:
            return
        self.next = now + settings.progress_interval
        meta = {"bytes": done, "total": total}
        try:
            self.task.update_state(state="PROGRESS", meta=meta)
            # `result` is a field Flower keeps and shows (task page, /api/task/info): the figures.
            self.task.send_event("task-progress", bytes=done, total=total, result=repr(meta))
        except _BROKER_ERRORS as exc:
            # Progress is a courtesy: a Redis outage must not fail the download itself.
            log.warning("progress not reported (%s); the download goes on", exc)


def _result(
    task: Task, outcome: Outcome, url: str, attempts: int, started: float
) -> dict[str, Any]:
    return {
        "url": redact_url(url),
        "final_url": redact_url(outcome.final_url),
        "path": outcome.path,
        "size": outcome.size,
        "sha256": outcome.sha256,
        "content_type": outcome.content_type,
        "http_status": outcome.http_status,
        "attempts": attempts,
        "resumed_from": outcome.resumed_from,
        "skipped": outcome.skipped,
        "elapsed_s": round(time.monotonic() - started, 3),
        "worker": task.request.hostname,
    }


LIMITS = Limits(
    settings.connect_timeout, settings.read_timeout, settings.max_bytes, settings.chunk_size
)


@app.task(
    name=TASK_NAME,
    bind=True,
    base=FetchTask,
    typing=False,
    throws=(PermanentError,),
)
def fetch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Download one URL to DOWNLOAD_DIR. Arguments and result: see the README's contract."""
    started = time.monotonic()
    request = arguments.parse(args, kwargs)
    attempts = _count_delivery(self)
    try:
        outcome = download(
            lifecycle.session(),
            request,
            settings.download_dir,
            LIMITS,
            _Progress(self),
            last_attempt=self.request.retries >= settings.max_retries,
        )
    except DestinationBusyError as exc:
        # Not the download's fault: wait for the other task without spending the retry budget;
        # the other task ends within its time limit, so this cannot loop forever.
        raise self.retry(exc=exc, countdown=retry_delay(0, None) + 0.5, max_retries=None) from None
    except TransientError as exc:
        if self.request.retries >= settings.max_retries:
            raise TransientError(f"gave up after {attempts} attempts: {exc}") from None
        raise self.retry(
            exc=exc,
            countdown=retry_delay(self.request.retries, exc.retry_after),
            max_retries=settings.max_retries,
        ) from None
    except SoftTimeLimitExceeded:
        raise PermanentError(
            f"stopped after DOWNLOAD_SOFT_TIME_LIMIT ({settings.soft_time_limit:g}s); the bytes "
            "received so far are kept, so submitting it again resumes"
        ) from None
    return _result(self, outcome, request.url, attempts, started)


@task_revoked.connect(sender=fetch)
def discard_revoked_partial(request: Any = None, terminated: bool = False, **_: Any) -> None:
    """A cancelled download leaves nothing behind: once the killed child has let go of the
    destination's lock, its partial file and record are removed (in a thread: this runs in the
    worker's main process, which must keep consuming)."""
    try:
        args = arguments.parse(tuple(request.args or ()), request.kwargs or {})
    except (PermanentError, AttributeError):
        return
    target = Target(settings.download_dir, args.dest, args.url)

    def discard() -> None:
        try:
            with target.locked(wait=settings.time_limit):
                target.discard()
        except (DownloadError, OSError) as exc:
            log.warning("could not remove the partial of revoked task %s: %s", request.id, exc)

    threading.Thread(target=discard, name="discard-revoked", daemon=True).start()
