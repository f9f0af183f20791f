"""The `downloads.fetch` task: parse, admit, transfer, settle. Celery concerns only (waits and
retries, parking, progress, the result); the fleet's Redis state is the run's (tasks/run.py), the
HTTP and the disk are in `tasks.core`."""

from __future__ import annotations

import logging
import time
from typing import Any

import requests
from celery import Task, states
from celery.exceptions import Ignore, Retry, SoftTimeLimitExceeded

from download_client import arguments
from download_client.arguments import DownloadRequest, utc_text
from download_client.contract import TASK_NAME, DownloadResult, Served
from download_client.errors import (
    DestinationBusyError,
    DownloadError,
    PermanentError,
    TransientError,
)
from download_client.redact import redact_url
from download_client.settings import Settings
from tasks import callback, runtime
from tasks.core import callbacks
from tasks.core.budgets import Busy
from tasks.core.failures import gave_up, gave_up_at_deadline
from tasks.core.ledger import Held
from tasks.core.transfer import Outcome, download, drop_mismatch
from tasks.deliveries import REDIS_ERRORS
from tasks.progress import Progress
from tasks.retries import (
    Journey,
    fault_delay,
    note_ttl,
    publish_policy,
    retry_note,
    send_again,
    until_deadline,
    wait_delay,
)
from tasks.run import Run
from tasks.runtime import Runtime

log = logging.getLogger(__name__)


class FetchTask(Task):  # type: ignore[misc]
    """Download one URL to DOWNLOAD_DIR. Arguments and result: see docs/contract.md."""

    name = TASK_NAME
    typing = False
    throws = (PermanentError,)
    max_retries = None  # the fault budget is counted in Journey, not by Celery's retries
    # STARTED is stored in the run's first round trip (Run.admit), not by Celery before it.
    track_started = False
    Request = "tasks.messages:RedactedRequest"
    Strategy = "tasks.messages:checked_strategy"

    def run(self, *args: Any, **kwargs: Any) -> DownloadResult:
        started = time.monotonic()
        rt = runtime.current()
        request = arguments.parse(args, kwargs)
        _check_callback(rt.settings, request.callback_url)
        run = Run(self, rt.settings, request)
        admitted = run.admit()
        if admitted.holder is not None:
            return self.not_mine(run, admitted.holder, started)
        outcome = self.transfer(rt, run, admitted.attempts)
        result = _result(self, outcome, request.url, admitted.attempts, started, run)
        run.succeed(result)
        return result

    def on_failure(self, exc: Exception, task_id: str, args: Any, kwargs: Any, einfo: Any) -> None:
        """Called once FAILURE is stored: what a permanent failure kept for the runs before it
        was stored goes (a body that is not the one asked for, tasks/core/transfer.py)."""
        if isinstance(exc, PermanentError):
            _drop_kept(arguments.parse(args, kwargs))

    def not_mine(self, run: Run, held: Held, started: float) -> DownloadResult:
        """Another run has the destination: take its result, or wait for it."""
        run.step_aside()
        if held.self_done:
            self._ended_already(run)
            raise Ignore()
        if held.done is not None:
            shared = {**held.done, "skipped": True, "elapsed_s": _since(started)}
            return {**shared, "waited_s": round(run.journey.waited_s, 3)}  # type: ignore[typeddict-item]
        busy = DestinationBusyError(f"another task is downloading to {run.request.dest} right now")
        raise self.wait(run, held.task, busy)

    def transfer(self, rt: Runtime, run: Run, attempts: int) -> Outcome:
        """One try at the transfer; a failure becomes a wait, a park, a retry or the task's end."""
        s = rt.settings
        run.journey = run.journey.begun(time.time())
        last = run.last_attempt(time.time())
        progress = Progress(self, s.progress_interval)
        if not run.gated:  # no slot to wait for: the run begins here (else at its gate)
            run.running()
        try:
            return download(self.session(rt), run.request, rt.root, rt.limits, progress, last,
                            run.gate(), self.request.id, run.pacing(), run.space,
                            run.spare())  # fmt: skip
        except DestinationBusyError as exc:
            run.let_go(claim=False)
            raise self.wait(run, run.journey.waiting_for, exc) from None
        except Busy as busy:
            raise self.park(run, busy) from None
        except TransientError as exc:
            if exc.retry_after:
                run.pause_origin(min(exc.retry_after, s.retry_backoff_max))
            # The claim stays while the task waits to retry: the destination is still its own.
            run.let_go(claim=last)
            if last:
                raise TransientError(_last_word(run, str(exc), attempts)) from None
            delay = until_deadline(fault_delay(s, run.journey.faults, exc.retry_after),
                                   run.deadline, time.time())  # fmt: skip
            self.note_retry(s, exc, delay, attempts, run.deadline)
            raise self.again(run, run.journey.after_fault(delay), delay, exc) from None
        except PermanentError:
            run.let_go(claim=True)
            raise
        except SoftTimeLimitExceeded:
            run.let_go(claim=True)
            raise PermanentError(
                f"stopped after DOWNLOAD_SOFT_TIME_LIMIT ({s.soft_time_limit:g}s); the bytes "
                "received so far are kept, so submitting it again resumes"
            ) from None
        except BaseException:
            run.let_go(claim=False)
            raise

    def park(self, run: Run, busy: Busy) -> Ignore:
        """The message waits in Redis for a slot (tasks/parking.py); this run is not counted.
        The download is WAITING (tasks/waiting.py), not RETRY: a wait is not a fault."""
        run.park(busy)
        return Ignore()

    def wait(self, run: Run, holder: str | None, why: DownloadError) -> Ignore:
        """Look again later without spending the fault budget; no worker process is held. The
        message is sent again with a countdown as a retry is, but the run ends WAITING, neither
        RETRY nor a `task-retried` event: a wait is not a fault."""
        delay = wait_delay(run.journey.waits)
        journey = run.journey.after_wait(delay, holder)
        send_again(self, exc=why, countdown=delay, headers=journey.headers(self),
                   retry_policy=publish_policy(run.settings), throw=False)  # fmt: skip
        run.wait(run.request.dest)
        log.info("waiting %.1f s for a busy destination", delay)
        return Ignore()

    def note_retry(
        self, s: Settings, why: DownloadError, delay: float, attempt: int, deadline: float | None
    ) -> None:
        """Why the download is in RETRY, when the next attempt is due and when its deadline
        ends, in the result backend's Redis where clients read results (docs/contract.md)."""
        note = retry_note(str(why), delay, attempt, deadline)
        try:
            self.backend.ledger.note_retry(self.request.id, note, note_ttl(delay, s.result_expires))
        except REDIS_ERRORS as exc:
            log.warning("retry note not written (%s)", exc)

    def again(self, run: Run, journey: Journey, delay: float, why: DownloadError) -> Retry:
        """The next attempt after a fault. With a deadline, RETRY says when it is due and when
        the deadline ends, and a wait over DOWNLOAD_PARK_AFTER is parked in Redis (this run's
        message is acknowledged; the sweep publishes the next one when it is due) instead of a
        countdown message that a worker holds in memory until then."""
        s = run.settings
        if run.deadline is not None:
            due = time.time() + delay
            why = TransientError(f"{why}; next attempt due {utc_text(due)}, deadline "
                                 f"{utc_text(run.deadline)}")  # fmt: skip
            if delay > s.park_after:
                try:
                    run.park_retry(journey, delay)
                    log.info("next attempt parked for %.1f s", delay)
                    return Retry(exc=why, when=delay)
                except REDIS_ERRORS as exc:
                    log.warning("next attempt not parked (%s); a countdown instead", exc)
        return send_again(
            self, exc=why, countdown=delay, headers=journey.headers(self),
            retry_policy=publish_policy(s),
        )  # fmt: skip

    def _ended_already(self, run: Run) -> None:
        """A copy delivered again (its acknowledgement was lost) of a download whose end is
        stored: its process may have died before the callback was queued, so queue it again
        (receivers dedupe by task id), or, after a FAILURE, before its kept body went."""
        meta = self.backend.get_task_meta(self.request.id)
        if meta["status"] == states.FAILURE:
            _drop_kept(run.request)
        if callback.callback_url_of(self.request) is not None:
            callback.enqueue(
                self.app, self.request.id, meta["status"], meta["result"], self.request
            )

    def session(self, rt: Runtime) -> requests.Session:
        """The process's one shared session (a benchmark's anti-pattern task overrides this)."""
        return rt.session


def _drop_kept(request: DownloadRequest) -> None:
    try:
        drop_mismatch(runtime.current().root, request)
    except (DownloadError, OSError) as err:  # the sweep removes it later
        log.warning("kept body not removed (%s)", err)


def _check_callback(s: Settings, url: str | None) -> None:
    """Refused before anything connects: no secret to sign with, or a host not allowed."""
    if url is None:
        return
    if not s.callback_secret:
        raise PermanentError(
            "callback_url: the workers have no DOWNLOAD_CALLBACK_SECRET to sign with"
        )
    callbacks.check_allowed(url, s.callback_allow)


def _result(
    task: Task, outcome: Outcome, url: str, attempts: int, started: float, run: Run
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
        waited_s=round(run.journey.waited_s, 3),
        retried_s=round(run.journey.retried_s, 3),
        deadline=None if run.deadline is None else round(run.deadline, 3),
        throttled_s=outcome.throttled_s,
        sources=[Served(url=redact_url(u), bytes=n, requests=k) for u, n, k in outcome.sources],
    )


def _last_word(run: Run, cause: str, attempts: int) -> str:
    """A transient failure's final message: at the deadline, or with the attempts spent."""
    spent = time.time() - (run.journey.first_at or time.time())
    if run.deadline is not None:
        return gave_up_at_deadline(cause, attempts, spent)
    return gave_up(cause, attempts, spent)


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)
