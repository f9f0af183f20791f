"""Every queue a worker consumes gets its lanes (download_client/lanes.py), consumed too.

Added through `celeryd_after_setup`, Celery's documented place to add queues to a worker before
its consumer starts, so Celery declares the lanes as it declares the queues themselves (and
binds them for native delayed delivery on RabbitMQ). The lanes come before their queue: on
Redis the fetch's idle wait then starts on the queue (worker/redis_transport.py), where most
work arrives."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.signals import celeryd_after_setup

from download_client.lanes import LANES, is_lane, lane
from download_client.settings import Settings


def connect(app: Celery, settings: Settings) -> None:
    celeryd_after_setup.connect(consume_lanes, weak=False, dispatch_uid="downloads-lanes")


def consume_lanes(sender: Any = None, instance: Any = None, **_: Any) -> None:
    queues = instance.app.amqp.queues
    homes = [name for name in queues.consume_from if not is_lane(name)]
    order: list[str] = []
    for home in homes:
        for which in LANES:
            queues[lane(home, which)]  # created as a missing queue is: like its home queue
        order += [*(lane(home, which) for which in LANES), home]
    queues.select(order)
