"""The poison-message guard: a message whose worker process dies every time it runs (killed, out
of memory) fails after DOWNLOAD_MAX_DELIVERIES deliveries instead of being redelivered for ever
by late acks. Deliveries are counted in each run's first round trip (tasks/core/ledger.py)."""

from __future__ import annotations

import logging

import redis
from kombu.exceptions import KombuError

from download_client.errors import PermanentError
from tasks.core.ledger import Ledger

log = logging.getLogger(__name__)
REDIS_ERRORS = (redis.RedisError, KombuError, OSError)


def check(delivered: int, limit: int) -> None:
    """PermanentError when this message was delivered more than `limit` times."""
    if delivered > limit:
        raise PermanentError(
            f"the download was started {delivered - 1} times and its worker process died each "
            "time (killed or out of memory); giving up"
        )


def uncount(ledger: Ledger, runs: list[tuple[str, int]]) -> None:
    """Take back the count of runs that were stopped on purpose (a shutdown), not by a death."""
    try:
        ledger.uncount(runs)
    except REDIS_ERRORS as exc:
        log.warning("deliveries of requeued downloads not uncounted (%s)", exc)
