"""The `downloads.fetch` task: Celery concerns only (arguments, retries, progress, redelivery
guard, the result). The HTTP and the disk are in `tasks.download`."""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import redis
from celery import Task
from celery.exceptions import Ignore, InvalidTaskError, Retry, SoftTimeLimitExceeded
from celery.signals import task_revoked
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy
from kombu.exceptions import KombuError

from tasks import TASK_NAME, arguments
from tasks.arguments import DownloadRequest
from tasks.claims import Claims, Held
from tasks.download import Limits, Outcome, download
from tasks.errors import DestinationBusyError, DownloadError, PermanentError, TransientError
from tasks.redact import redact_reprs, redact_url
from tasks.storage import Target
from worker import lifecycle
from worker.celery_app import app, settings

log = logging.getLogger(__name__)
_BROKER_ERRORS = (redis.RedisError, KombuError, OSError)
WAIT_CAP_S = 10.0
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


def wait_delay(waits: int) -> float:
    """Seconds before a waiting task looks again: 0.5 s doubling to WAIT_CAP_S, so a holder of an
    hour costs a waiter a few hundred messages, not thousands."""
    return min(WAIT_CAP_S, 0.5 * 2.0 ** min(waits, 16)) * random.uniform(0.8, 1.0)


@dataclass(frozen=True)
class Journey:
    """What a download carries from run to run in its message headers (the kwargs are the public
    contract): transient faults so far, waits so far, seconds spent waiting, the holder it waits
    for. Celery's own `retries` counts every re-send, waits included, so it is not the budget."""

    faults: int = 0
    waits: int = 0
    waited_s: float = 0.0
    waiting_for: str | None = None

    @classmethod
    def of(cls, task: Task) -> Journey:
        seen = task.request.headers or {}
        try:
            return cls(
                int(seen.get("download_faults", 0)),
                int(seen.get("download_waits", 0)),
                float(seen.get("download_waited_s", 0.0)),
                seen.get("download_waiting_for") or None,
            )
        except (TypeError, ValueError):
            return cls()

    def headers(self, task: Task) -> dict[str, Any]:
        return {
            **(task.request.headers or {}),
            "download_faults": self.faults,
            "download_waits": self.waits,
            "download_waited_s": round(self.waited_s, 3),
            "download_waiting_for": self.waiting_for or "",
        }


def _wait(task: Task, journey: Journey, holder: str | None, why: DownloadError) -> Retry:
    """Send the task again later without spending its fault budget; it holds no worker process
    meanwhile."""
    delay = wait_delay(journey.waits)
    later = replace(
        journey, waits=journey.waits + 1, waited_s=journey.waited_s + delay, waiting_for=holder
    )
    return task.retry(
        exc=why, countdown=delay, headers=later.headers(task), retry_policy=_publish_policy()
    )


def _publish_policy() -> dict[str, float]:
    """Re-sending a task (a retry, a wait) rides out a broker outage as long as a result store
    does: about one try a second for DOWNLOAD_RESULT_OUTAGE seconds. Celery drops the message if
    the re-send fails."""
    tries = int(settings.result_outage) + 1
    return {"max_retries": tries, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def _count_delivery(task: Task) -> int:
    """Count this run in Redis; return the runs so far. A message whose child dies every time
    (a poison URL) is redelivered forever by acks_late: it fails after DOWNLOAD_MAX_DELIVERIES."""
    client = getattr(task.backend, "client", None)
    if client is None:
        return task.request.retries + 1  # type: ignore[no-any-return]
    tid = task.request.id
    deliveries = delivery_key(tid, task.request.retries)
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


def delivery_key(task_id: str, retries: int) -> str:
    return f"downloads:deliveries:{task_id}:{retries}"


def _claims(task: Task, request: DownloadRequest) -> Claims | None:
    client = getattr(task.backend, "client", None)
    if client is None:
        return None
    # The holder may run up to its hard time limit, then wait up to the longest retry countdown.
    ttl = settings.time_limit + settings.retry_backoff_max + 60
    return Claims(client, request, task.request.id, ttl)


def _acquire(claims: Claims | None, journey: Journey) -> Held | None:
    if claims is None:
        return None
    try:
        return claims.acquire(journey.waiting_for)
    except _BROKER_ERRORS as exc:
        # Redis away: the destination's flock alone keeps writers apart on this file system.
        log.warning("destination claim not taken (%s); relying on the file lock", exc)
        return None


def _settle(claims: Claims | None, result: dict[str, Any] | None) -> None:
    if claims is None:
        return
    try:
        claims.finish(result) if result is not None else claims.release()
    except _BROKER_ERRORS as exc:
        log.warning("destination claim not released (%s); it expires on its own", exc)


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
        "elapsed_s": _since(started),
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
    max_retries=None,  # the fault budget is counted in Journey, not by Celery's retries
)
def fetch(self: Task, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """Download one URL to DOWNLOAD_DIR. Arguments and result: see the README's contract."""
    started = time.monotonic()
    request = arguments.parse(args, kwargs)
    journey = Journey.of(self)
    claims = _claims(self, request)
    held = _acquire(claims, journey)
    if held is not None and held.self_done:
        raise Ignore()  # a redelivered copy of a download that already succeeded
    if held is not None and held.done is not None:
        return {**held.done, "skipped": True, "elapsed_s": _since(started)}
    if held is not None:
        busy = DestinationBusyError(f"another task is downloading to {request.dest} right now")
        raise _wait(self, journey, held.task, busy)
    attempts = _count_delivery(self)
    try:
        outcome = download(
            lifecycle.session(),
            request,
            settings.download_dir,
            LIMITS,
            _Progress(self),
            last_attempt=journey.faults >= settings.max_retries,
        )
    except DestinationBusyError as exc:
        raise _wait(self, journey, journey.waiting_for, exc) from None
    except TransientError as exc:
        if journey.faults >= settings.max_retries:
            _settle(claims, None)
            raise TransientError(f"gave up after {attempts} attempts: {exc}") from None
        later = replace(journey, faults=journey.faults + 1)
        # The claim stays: the destination is still this task's while it waits for its retry.
        raise self.retry(
            exc=exc,
            countdown=retry_delay(journey.faults, exc.retry_after),
            headers=later.headers(self),
            retry_policy=_publish_policy(),
        ) from None
    except PermanentError:
        _settle(claims, None)
        raise
    except SoftTimeLimitExceeded:
        _settle(claims, None)
        raise PermanentError(
            f"stopped after DOWNLOAD_SOFT_TIME_LIMIT ({settings.soft_time_limit:g}s); the bytes "
            "received so far are kept, so submitting it again resumes"
        ) from None
    result = _result(self, outcome, request.url, attempts, started)
    _settle(claims, result)
    return result


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


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
