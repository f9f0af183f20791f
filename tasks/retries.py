"""When a download runs again, and what it carries from run to run.

Two kinds of "again": a transient fault (a 503, a cut connection) spends the fault budget,
DOWNLOAD_MAX_RETRIES; a wait (the destination is busy) spends nothing. Both are Celery retries
with a countdown, so no worker process is held meanwhile. Celery's own `retries` counts every
re-send, waits included, so the budget travels in the message headers (the kwargs are the public
contract): see Journey.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Any

from celery import Task

from download_client.settings import Settings

WAIT_CAP_S = 10.0


def fault_delay(settings: Settings, faults: int, retry_after: float | None) -> float:
    """Seconds before the next try: the server's Retry-After, or exponential backoff with full
    jitter; both capped by DOWNLOAD_RETRY_BACKOFF_MAX."""
    cap = settings.retry_backoff_max
    if retry_after is not None:
        return min(retry_after, cap)
    return random.uniform(0, min(cap, settings.retry_backoff * 2.0 ** min(faults, 32)))


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


@dataclass(frozen=True)
class Journey:
    """What a download carries in its message headers: transient faults so far, waits so far,
    seconds spent waiting, and the holder it waits for."""

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

    def after_fault(self) -> Journey:
        return replace(self, faults=self.faults + 1)

    def after_wait(self, delay: float, holder: str | None) -> Journey:
        return replace(
            self, waits=self.waits + 1, waited_s=self.waited_s + delay, waiting_for=holder
        )

    def headers(self, task: Task) -> dict[str, Any]:
        return {
            **(task.request.headers or {}),
            "download_faults": self.faults,
            "download_waits": self.waits,
            "download_waited_s": round(self.waited_s, 3),
            "download_waiting_for": self.waiting_for or "",
        }
