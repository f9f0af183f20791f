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


def count(client: Any, task_id: str, retries: int, limit: int, expires: int) -> int:
    """Count this run; return the download's runs so far (its `attempts`), or raise
    PermanentError when this message was delivered more than `limit` times."""
    if client is None:
        return retries + 1
    deliveries, attempts = delivery_key(task_id, retries), f"downloads:attempts:{task_id}"
    pipe = client.pipeline()
    pipe.incr(deliveries).expire(deliveries, expires)
    pipe.incr(attempts).expire(attempts, expires)
    try:
        delivered, _, attempt, _ = pipe.execute()
    except REDIS_ERRORS as exc:
        log.warning("deliveries not counted (%s)", exc)
        return retries + 1
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


def deferred(client: Any, task_id: str, retries: int) -> None:
    """Take back this run's count: it waited for an origin slot and did not download."""
    try:
        client.pipeline().decr(delivery_key(task_id, retries)).decr(
            f"downloads:attempts:{task_id}"
        ).execute()
    except REDIS_ERRORS as exc:
        log.warning("deferred run not uncounted (%s)", exc)
