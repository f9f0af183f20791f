"""The queues of one download queue. Beside each queue `q` that workers consume, they consume
`q.woken`: downloads that come back from a wait without a worker (parked for a slot at their
origin, or for their next attempt after a fault) are published there when they are woken, so
they do not wait again behind the work queued in `q` meanwhile. A worker takes from the two in
turn (kombu's round robin on Redis, one consumer per queue on RabbitMQ)."""

from __future__ import annotations

import re

WOKEN_SUFFIX = ".woken"

# What native delayed delivery puts in front of a routing key: the delay in 28 binary digits.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def home_queue(routing_key: str) -> str:
    """The queue a delivery belongs to, from its routing key: without native delayed delivery's
    prefix, and the queue itself for a message of its woken lane."""
    return without_delay(routing_key).removesuffix(WOKEN_SUFFIX)


def without_delay(routing_key: str) -> str:
    """A routing key without native delayed delivery's prefix (for every queue declared here,
    the routing key is the queue's name)."""
    return _DELAY_PREFIX.sub("", routing_key, count=1)


def woken_lane(queue: str) -> str:
    return home_queue(queue) + WOKEN_SUFFIX


def is_lane(queue: str) -> bool:
    return queue.endswith(WOKEN_SUFFIX)
