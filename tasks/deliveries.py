"""Counting deliveries of one message, so that a poison URL (one whose worker process dies every
time: killed, out of memory) fails after DOWNLOAD_MAX_DELIVERIES instead of being redelivered
for ever by late acks. The counts live in the result backend's Redis."""

from __future__ import annotations

import logging
from typing import Any

import redis
from kombu.exceptions import KombuError

from download_client.errors import PermanentError

log = logging.getLogger(__name__)
REDIS_ERRORS = (redis.RedisError, KombuError, OSError)


def delivery_key(task_id: str, retries: int) -> str:
    return f"downloads:deliveries:{task_id}:{retries}"


def count_on(pipe: Any, task_id: str, retries: int, expires: int) -> None:
    """Queue the count of this run on `pipe`: four answers that `counted` reads."""
    deliveries, attempts = delivery_key(task_id, retries), f"downloads:attempts:{task_id}"
    pipe.incr(deliveries).expire(deliveries, expires)
    pipe.incr(attempts).expire(attempts, expires)


def counted(answers: list[Any], limit: int) -> int:
    """The download's runs so far (its `attempts`) from `count_on`'s answers, or PermanentError
    when this message was delivered more than `limit` times."""
    delivered, _, attempt, _ = answers
    if delivered > limit:
        raise PermanentError(
            f"the download was started {delivered - 1} times and its worker process died each "
            "time (killed or out of memory); giving up"
        )
    return int(attempt)


def uncount(client: Any, runs: list[tuple[str, int]]) -> None:
    """Take back the count of runs that were stopped on purpose (a shutdown), not by a death."""
    try:
        pipe = client.pipeline()
        for task_id, retries in runs:
            pipe.decr(delivery_key(task_id, retries))
        pipe.execute()
    except REDIS_ERRORS as exc:
        log.warning("deliveries of requeued downloads not uncounted (%s)", exc)


def deferred(client: Any, task_id: str, retries: int, pipe: Any = None) -> None:
    """Take back this run's count: it waited (for an origin slot, a destination) and did not
    download (queued on `pipe` when given)."""
    try:
        p = pipe or client.pipeline()
        p.decr(delivery_key(task_id, retries)).decr(f"downloads:attempts:{task_id}")
        if pipe is None:
            p.execute()
    except REDIS_ERRORS as exc:
        log.warning("deferred run not uncounted (%s)", exc)
