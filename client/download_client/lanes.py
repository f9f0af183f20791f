"""The queues of one download queue `q`: `q` itself, `q.urgent` and `q.woken`; workers consume
all three, taking from them in turn (kombu's round robin on Redis, one consumer each on
RabbitMQ), so each starts its messages ahead of what is queued in the others.

- `q.urgent`, the express lane: a download submitted there (`submit(..., urgent=True)`,
  `downloads submit --urgent`, or any producer naming the queue) is urgent. A message sent to
  `q` is never urgent, whatever it carries.
- `q.woken`: downloads that come back from a wait without a worker (parked for a slot at their
  origin, or for their next attempt after a fault) are published there when they are woken, so
  they do not wait again behind the work queued in `q` meanwhile. An urgent one goes back to
  `q.urgent`."""

from __future__ import annotations

import re

from download_client.groups import split_group

URGENT, WOKEN = "urgent", "woken"
LANES = (WOKEN, URGENT)

# What native delayed delivery puts in front of a routing key: the delay in 28 binary digits.
_DELAY_PREFIX = re.compile(r"^(?:[01]\.){28}")


def without_delay(routing_key: str) -> str:
    """A routing key without native delayed delivery's prefix (for every queue declared here,
    the routing key is the queue's name)."""
    return _DELAY_PREFIX.sub("", routing_key, count=1)


def lane_of(routing_key: str) -> str | None:
    """The lane a delivery came through (URGENT or WOKEN), or None for the queue itself."""
    name = without_delay(routing_key)
    return next((lane for lane in LANES if name.endswith(f".{lane}")), None)


def home_queue(routing_key: str) -> str:
    """The queue a delivery belongs to, from its routing key: without native delayed delivery's
    prefix, and without a lane's suffix."""
    name, lane = without_delay(routing_key), lane_of(routing_key)
    return name.removesuffix(f".{lane}") if lane else name


def lane(queue: str, which: str) -> str:
    """A queue's lane; a group queue's lanes are its queue's (download_client/groups.py)."""
    return f"{split_group(home_queue(queue))[0]}.{which}"


def woken_lane(queue: str) -> str:
    return lane(queue, WOKEN)


def urgent_lane(queue: str) -> str:
    return lane(queue, URGENT)


def is_lane(queue: str) -> bool:
    return lane_of(queue) is not None
