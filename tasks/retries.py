"""When a download runs again, and what it carries from run to run.

Two kinds of "again": a transient fault (a 503, a cut connection) spends the fault budget,
DOWNLOAD_MAX_RETRIES, or with a deadline is retried until the deadline, whatever the count; a wait
(the destination is busy) spends nothing. Both are Celery retries
with a countdown, so no worker process is held meanwhile. Celery's own `retries` counts every
re-send, waits included, so the budget travels in the message headers (the kwargs are the public
contract): see Journey.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from dataclasses import dataclass, replace
from typing import Any

from celery import Task
from celery.exceptions import Reject, Retry

from download_client.settings import Settings
from tasks.deliveries import REDIS_ERRORS

log = logging.getLogger(__name__)

# What RabbitMQ's dead-lettering adds to a message that went through the delayed-delivery queues.
# Sent again with them, a message counts as a dead-letter cycle, and RabbitMQ before 4.0.1 holds
# it in the delay queues for minutes. Celery leaves the same names out when it re-sends a task
# itself (celery.app.task.Context.as_execution_options); a retry given its own headers must too.
DEAD_LETTERING = frozenset(
    {
        "x-death",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-last-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
    }
)

WAIT_CAP_S = 10.0
# A retry note outlives its due time by this much: the retry may wait in a busy queue.
NOTE_MARGIN_S = 60


def fault_delay(settings: Settings, faults: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After, or exponential backoff with full
    jitter; both capped by DOWNLOAD_RETRY_BACKOFF_MAX."""
    cap = settings.retry_backoff_max
    if retry_after is not None:
        return min(retry_after, cap)
    return random.uniform(0, min(cap, settings.retry_backoff * 2.0 ** min(faults, 32)))


def until_deadline(delay: float, deadline: float | None, now: float) -> float:
    """The wait, cut so that the next attempt runs no later than the deadline."""
    if deadline is None:
        return delay
    return max(0.0, min(delay, deadline - now))


def wait_delay(waits: int) -> float:
    """Seconds before a waiting task looks again: 0.5 s doubling to WAIT_CAP_S, so a holder of an
    hour costs a waiter a few hundred messages, not thousands."""
    return min(WAIT_CAP_S, 0.5 * 2.0 ** min(waits, 16)) * random.uniform(0.8, 1.0)


def publish_policy(settings: Settings) -> dict[str, float]:
    """Re-sending a task (a retry, a wait) rides out a broker outage as long as a result store
    does: about one try a second for DOWNLOAD_RESULT_OUTAGE seconds. Celery drops the message if
    the re-send fails."""
    tries = int(settings.result_outage) + 1
    return {"max_retries": tries, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def send_again(task: Task, **options: Any) -> Retry:
    """`task.retry(**options)`, except when the broker did not take the re-send (it stayed away
    longer than the publish policy waits): Celery then rejects the message without requeueing
    and records FAILURE (celery.app.task.Task.retry), and the download is lost. Here the message
    is put back instead; with Redis away that fails too, and its lease lapses, which puts it
    back once Redis answers."""
    try:
        return task.retry(**options)
    except Reject as exc:
        if exc.requeue or not isinstance(exc.reason, REDIS_ERRORS):
            raise
        log.warning("the next run was not sent (%s); this message is put back instead", exc.reason)
        raise Reject(exc.reason, requeue=True) from None


def retry_note(reason: str, delay: float, attempt: int, deadline: float | None = None) -> str:
    """The note a client reads while the download waits for its retry: Celery's RETRY state
    holds the exception but not when the next attempt is due (nor the deadline, when it has
    one)."""
    note: dict[str, Any] = {"reason": reason, "due": round(time.time() + delay, 3),
                            "attempt": attempt}  # fmt: skip
    if deadline is not None:
        note["deadline"] = round(deadline, 3)
    return json.dumps(note)


def note_ttl(delay: float, result_expires: int) -> int:
    """The note lasts until a little after the retry is due, never longer than the results."""
    return max(1, min(math.ceil(delay) + NOTE_MARGIN_S, result_expires))


@dataclass(frozen=True)
class Journey:
    """What a download carries in its message headers: transient faults so far, waits so far,
    seconds spent waiting, the holder it waits for, when its first attempt began (epoch
    seconds; a final failure says how long the attempts took) and seconds spent waiting for the
    next attempt after faults."""

    faults: int = 0
    waits: int = 0
    waited_s: float = 0.0
    waiting_for: str | None = None
    first_at: float | None = None
    retried_s: float = 0.0

    @classmethod
    def of(cls, task: Task) -> Journey:
        seen = task.request.headers or {}
        try:
            return cls(
                int(seen.get("download_faults", 0)),
                int(seen.get("download_waits", 0)),
                float(seen.get("download_waited_s", 0.0)),
                seen.get("download_waiting_for") or None,
                float(seen["download_first_at"]) if seen.get("download_first_at") else None,
                float(seen.get("download_retried_s", 0.0)),
            )
        except (TypeError, ValueError):
            return cls()

    def begun(self, now: float) -> Journey:
        """At an attempt: the first one's time is kept, a later one's ignored."""
        return self if self.first_at is not None else replace(self, first_at=now)

    def after_fault(self, delay: float = 0.0) -> Journey:
        return replace(self, faults=self.faults + 1, retried_s=self.retried_s + delay)

    def after_wait(self, delay: float, holder: str | None) -> Journey:
        return replace(
            self, waits=self.waits + 1, waited_s=self.waited_s + delay, waiting_for=holder
        )

    def headers(self, task: Task) -> dict[str, Any]:
        kept = {k: v for k, v in (task.request.headers or {}).items() if k not in DEAD_LETTERING}
        return {
            **kept,
            "download_faults": self.faults,
            "download_waits": self.waits,
            "download_waited_s": round(self.waited_s, 3),
            "download_waiting_for": self.waiting_for or "",
            "download_first_at": self.first_at or "",
            "download_retried_s": round(self.retried_s, 3),
        }
