"""The `downloads.fetch` task: Celery concerns only (arguments, waits and retries, the poison
guard, progress, the result). The HTTP and the disk are in `tasks.core`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import requests
from celery import Task, states
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded

from download_client import arguments
from download_client.arguments import DownloadRequest
from download_client.contract import TASK_NAME, DownloadResult
from download_client.errors import (
    DestinationBusyError,
    DownloadError,
    PermanentError,
    TransientError,
)
from download_client.redact import redact_url
from download_client.settings import Settings
from tasks import callback, counters, deliveries, parking, runtime
from tasks.core import callbacks
from tasks.core.claims import Claims, Held
from tasks.core.failures import gave_up
from tasks.core.origins import OriginBusy, Origins
from tasks.core.transfer import Outcome, download
from tasks.deliveries import REDIS_ERRORS
from tasks.progress import Progress
from tasks.retries import (
    Journey,
    fault_delay,
    note_key,
    note_ttl,
    publish_policy,
    retry_note,
    wait_delay,
)
from tasks.runtime import Runtime

log = logging.getLogger(__name__)


class FetchTask(Task):  # type: ignore[misc]
    """Download one URL to DOWNLOAD_DIR. Arguments and result: see docs/contract.md."""

    name = TASK_NAME
    typing = False
    throws = (PermanentError,)
    max_retries = None  # the fault budget is counted in Journey, not by Celery's retries
    # STARTED is stored by `begin`, in the task's first round trip, not by Celery before it.
    track_started = False
    Request = "tasks.messages:RedactedRequest"
    Strategy = "tasks.messages:checked_strategy"

    def run(self, *args: Any, **kwargs: Any) -> DownloadResult:
        started = time.monotonic()
        rt = runtime.current()
        request = arguments.parse(args, kwargs)
        if request.callback_url is not None:
            _check_callback(rt.settings, request.callback_url)
        journey = Journey.of(self)
        claims = self.claims(rt.settings, request)
        origins = self.origins(rt.settings)
        held, attempts = self.begin(rt.settings, request, journey, claims, origins)
        if held is not None:
            self._step_aside(origins)
        if held is not None and held.self_done:
            # A redelivered copy of a download that already succeeded: its process may have died
            # before the callback was queued, so queue it again (receivers dedupe by task id).
            self._call_back_again()
            raise Ignore()
        if held is not None and held.done is not None:
            shared = {**held.done, "skipped": True, "elapsed_s": _since(started)}
            return {**shared, "waited_s": round(journey.waited_s, 3)}  # type: ignore[typeddict-item]
        if held is not None:
            busy = DestinationBusyError(f"another task is downloading to {request.dest} right now")
            raise self.wait(rt.settings, journey, held.task, busy)
        try:
            outcome = self.attempt(rt, request, journey, claims, origins, attempts)
        except BaseException:
            if origins is not None:
                self._leave(origins)
            raise
        result = _result(self, outcome, request.url, attempts, started, journey)
        self._finish(claims, origins, result)
        return result

    def begin(
        self,
        s: Settings,
        request: DownloadRequest,
        journey: Journey,
        claims: Claims | None,
        origins: Origins | None,
    ) -> tuple[Held | None, int]:
        """Take the destination's claim, count this run (the poison guard), store STARTED and
        try for a slot at the origin, in one round trip. Returns who else holds the destination
        (None: nobody) and the download's runs so far."""
        client = self.redis()
        if client is None:
            self._started(None)
            return None, self.request.retries + 1
        pipe = client.pipeline(transaction=False)
        if claims is not None:
            claims.acquire_on(pipe, journey.waiting_for)
        deliveries.count_on(pipe, self.request.id, self.request.retries, s.result_expires)
        started = self._started(pipe)
        if origins is not None:
            origins.try_enter(request.url, pipe)
        try:
            answers = pipe.execute()
        except REDIS_ERRORS as exc:
            # Redis away: the destination's flock alone keeps writers apart on this file system.
            log.warning("destination claim and delivery count not taken (%s)", exc)
            return None, self.request.retries + 1
        if origins is not None:
            answers = origins.tried(answers)
        if started:
            answers = answers[:-1]
        try:
            attempts = deliveries.counted(answers[-4:], s.max_deliveries)
        except PermanentError:  # a poison message: its waiters must not wait for it any longer
            _settle(claims, None)
            if origins is not None:
                self._leave(origins)
            raise
        return (claims.acquired(answers[0]) if claims is not None else None), attempts

    def _started(self, pipe: Any) -> bool:
        """STARTED, as Celery stores it (pid and hostname), queued on `pipe` when the backend
        can take it there; True when queued."""
        meta = {"pid": os.getpid(), "hostname": self.request.hostname}
        queue = getattr(self.backend, "queue_state", None)
        if pipe is not None and queue is not None:  # noqa: SIM102 (mypy narrows `queue` here)
            if queue(pipe, self.request.id, meta, states.STARTED, self.request):
                return True
        try:
            self.backend.store_result(self.request.id, meta, states.STARTED, request=self.request)
        except REDIS_ERRORS as exc:
            log.warning("STARTED not stored (%s); the download goes on", exc)
        return False

    def _step_aside(self, origins: Origins | None) -> None:
        """This run does not download (another task has the destination): its count and any
        origin slot it took go back."""
        rid, retries = self.request.id, self.request.retries
        self._give_back(origins, lambda pipe: deliveries.deferred(None, rid, retries, pipe))

    def attempt(
        self,
        rt: Runtime,
        request: DownloadRequest,
        journey: Journey,
        claims: Claims | None,
        origins: Origins | None,
        attempts: int,
    ) -> Outcome:
        """One try at the transfer; a failure becomes a wait, a retry or the task's end."""
        s = rt.settings
        journey = journey.begun(time.time())
        last = journey.faults >= s.max_retries
        progress = Progress(self, s.progress_interval)
        gate = origins.enter if origins is not None else None
        try:
            return download(self.session(rt), request, rt.root, rt.limits, progress, last, gate)
        except DestinationBusyError as exc:
            raise self.wait(s, journey, journey.waiting_for, exc) from None
        except OriginBusy as busy:
            raise self.park(busy) from None
        except TransientError as exc:
            if origins is not None and exc.retry_after:
                origins.pause_held(min(exc.retry_after, s.retry_backoff_max))
            if last:
                _settle(claims, None)
                spent = time.time() - (journey.first_at or time.time())
                raise TransientError(gave_up(str(exc), attempts, spent)) from None
            # The claim stays: the destination is still this task's while it waits to retry.
            delay = fault_delay(s, journey.faults, exc.retry_after)
            self.note_retry(s, exc, delay, attempts)
            raise self.resend(s, journey.after_fault(), delay, exc) from None
        except PermanentError:
            _settle(claims, None)
            raise
        except SoftTimeLimitExceeded:
            _settle(claims, None)
            raise PermanentError(
                f"stopped after DOWNLOAD_SOFT_TIME_LIMIT ({s.soft_time_limit:g}s); the bytes "
                "received so far are kept, so submitting it again resumes"
            ) from None

    def origins(self, s: Settings) -> Origins | None:
        client = self.redis()
        if client is None or (not s.host_concurrency and not s.host_limits):
            return None
        return Origins(client, self.request.id, s.host_limit, lambda: parking.message(self))

    def park(self, busy: OriginBusy) -> Ignore:
        """The message waits in Redis for a slot (tasks/parking.py); this run is not counted."""
        deliveries.deferred(self.redis(), self.request.id, self.request.retries)
        self.backend.mark_as_retry(self.request.id, busy, request=self.request)
        return Ignore()

    def _finish(
        self, claims: Claims | None, origins: Origins | None, result: DownloadResult
    ) -> None:
        """Leave the result to the destination's waiters, give the origin slot back and count
        the bytes: with SUCCESS, in its round trip, where the backend can take them there."""
        finish = _Finish(self, claims, origins, result)
        ride = getattr(self.backend, "ride", None)
        if ride is not None:
            ride(self.request.id, finish)
        elif self.redis() is not None:
            self._give_back(origins, finish.queue)

    def _give_back(self, origins: Origins | None, queue: Callable[[Any], None]) -> None:
        """Give the origin slot back with the writes `queue` puts on the same pipeline (one
        round trip), then publish who the slot woke."""
        client = self.redis()
        if client is None:
            return
        try:
            pipe = client.pipeline(transaction=False)
            released = origins is not None and origins.leave(pipe)
            queue(pipe)
            answers = pipe.execute()
            if origins is not None and released:
                origins.took_back(answers[0])
                parking.publish(self.app, origins.woken)
        except REDIS_ERRORS as exc:
            log.warning("origin slot and claim not given back (%s); they expire on their own", exc)

    def _leave(self, origins: Origins) -> None:
        try:
            origins.leave()
            parking.publish(self.app, origins.woken)
        except REDIS_ERRORS as exc:
            log.warning("origin slot not released (%s); its lease ends on its own", exc)

    def wait(self, s: Settings, journey: Journey, holder: str | None, why: DownloadError) -> Retry:
        """Look again later without spending the fault budget; no worker process is held."""
        delay = wait_delay(journey.waits)
        return self.resend(s, journey.after_wait(delay, holder), delay, why)

    def note_retry(self, s: Settings, why: DownloadError, delay: float, attempt: int) -> None:
        """Why the download is in RETRY and when the next attempt is due, in the result
        backend's Redis where clients read results (docs/contract.md)."""
        client = self.redis()
        if client is None:
            return
        note = retry_note(str(why), delay, attempt)
        try:
            client.set(note_key(self.request.id), note, ex=note_ttl(delay, s.result_expires))
        except REDIS_ERRORS as exc:
            log.warning("retry note not written (%s)", exc)

    def resend(self, s: Settings, journey: Journey, delay: float, why: DownloadError) -> Retry:
        return self.retry(
            exc=why, countdown=delay, headers=journey.headers(self), retry_policy=publish_policy(s)
        )

    def _call_back_again(self) -> None:
        if callback.callback_url_of(self.request) is not None:
            meta = self.backend.get_task_meta(self.request.id)
            callback.enqueue(
                self.app, self.request.id, meta["status"], meta["result"], self.request
            )

    def session(self, rt: Runtime) -> requests.Session:
        """The process's one shared session (a benchmark's anti-pattern task overrides this)."""
        return rt.session

    def redis(self) -> Any:
        """The result backend's Redis client, or None when results live elsewhere."""
        return getattr(self.backend, "client", None)

    def claims(self, s: Settings, request: DownloadRequest) -> Claims | None:
        client = self.redis()
        if client is None:
            return None
        # The holder may run up to its hard time limit, then wait up to the longest countdown.
        return Claims(client, request, self.request.id, s.time_limit + s.retry_backoff_max + 60)


class _Finish:
    """A download's last writes (claim, origin slot, byte count), queued on the pipeline that
    stores its SUCCESS."""

    def __init__(
        self, task: FetchTask, claims: Claims | None, origins: Origins | None, result: Any
    ) -> None:
        self.task, self.claims, self.origins, self.result = task, claims, origins, result
        self.released = False

    def queue(self, pipe: Any) -> None:
        self.released = self.origins is not None and self.origins.leave(pipe)
        if self.claims is not None:
            self.claims.finish(dict(self.result), pipe)
        counters.count_bytes_on(pipe, self.result)

    def done(self, answers: list[Any]) -> None:
        if self.origins is not None and self.released:
            self.origins.took_back(answers[0])
            parking.publish(self.task.app, self.origins.woken)


def _check_callback(s: Settings, url: str) -> None:
    """Refused before anything connects: no secret to sign with, or a host not allowed."""
    if not s.callback_secret:
        raise PermanentError(
            "callback_url: the workers have no DOWNLOAD_CALLBACK_SECRET to sign with"
        )
    callbacks.check_allowed(url, s.callback_allow)


def _settle(claims: Claims | None, result: DownloadResult | None) -> None:
    if claims is None:
        return
    try:
        claims.finish(dict(result)) if result is not None else claims.release()
    except REDIS_ERRORS as exc:
        log.warning("destination claim not released (%s); it expires on its own", exc)


def _result(
    task: Task, outcome: Outcome, url: str, attempts: int, started: float, journey: Journey
) -> DownloadResult:
    return DownloadResult(
        url=redact_url(url),
        final_url=redact_url(outcome.final_url),
        path=outcome.path,
        size=outcome.size,
        sha256=outcome.sha256,
        content_type=outcome.content_type,
        http_status=outcome.http_status,
        attempts=attempts,
        resumed_from=outcome.resumed_from,
        skipped=outcome.skipped,
        elapsed_s=_since(started),
        worker=task.request.hostname,
        content_encoding=outcome.content_encoding,
        waited_s=round(journey.waited_s, 3),
    )


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
