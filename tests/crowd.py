"""A crowd of downloads with a long deadline waiting on a dead origin, for the end-to-end tests on
Redis and on RabbitMQ: submitting it, counting where its members are (parked in the due set, or
held by the broker or a worker), the worker's memory, and a batch of ordinary downloads that must
find every slot free."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import psutil
import redis
from celery import Celery
from celery.result import AsyncResult

from download_client.lanes import woken_lane
from tests.conftest import submit
from tests.harness import Worker, free_port, wait_for
from tests.server import OriginServer

DUE = "downloads:origins:due"
DAY_S = 86_400
MIB = 1024 * 1024
# An hour's backoff from the first fault on, where a long outage's backoff ends up: few are due
# during the test. DOWNLOAD_PARK_AFTER is the default: each wait is parked, none a countdown.
SETTINGS = {
    "DOWNLOAD_RETRY_BACKOFF": "3600",
    "DOWNLOAD_RETRY_BACKOFF_MAX": "3600",
}


def dead_url(key: str) -> str:
    """A URL on a loopback port nothing listens on: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}/bytes/5000?key={key}"


def submit_crowd(client: Celery, worker: Worker, n: int, key: str) -> list[str]:
    url = dead_url(key)
    return [
        submit(client, worker, url=url, dest=f"crowd/{key}-{i}.bin", deadline=DAY_S).id
        for i in range(n)
    ]


def parked(backend: redis.Redis, ids: Iterable[str]) -> int:
    """How many of `ids` wait in the due set for their next attempt."""
    wanted = set(ids)
    return sum(json.loads(m)["id"] in wanted for m in backend.zrange(DUE, 0, -1))


def unpark(backend: redis.Redis, ids: Iterable[str]) -> None:
    """Take `ids` out of the due set (a test's leftovers, on a Redis other tests share)."""
    wanted = set(ids)
    mine = [m for m in backend.zrange(DUE, 0, -1) if json.loads(m)["id"] in wanted]
    if mine:
        backend.zrem(DUE, *mine)


def states(backend: redis.Redis, ids: list[str]) -> dict[str, int]:
    """How many of `ids` are in each state, as the result backend holds them."""
    counts: dict[str, int] = {}
    for raw in backend.mget([f"celery-task-meta-{i}" for i in ids]):
        state = json.loads(raw)["status"] if raw else "PENDING"
        counts[state] = counts.get(state, 0) + 1
    return counts


def held_by_redis(broker: redis.Redis, queue: str, ids: Iterable[str]) -> int:
    """How many of `ids` have a message in the queue (or its woken lane) or in kombu's
    unacknowledged records."""
    messages = [
        *broker.lrange(queue, 0, -1),
        *broker.lrange(woken_lane(queue), 0, -1),
        *broker.hvals("unacked"),
    ]
    return sum(any(i.encode() in m for m in messages) for i in ids)


@dataclass(frozen=True)
class Memory:
    """A worker's memory: `pss`, all its processes' proportional set sizes added (each page
    shared by the main process and its children counted once, unlike their RSS), and `main`,
    the main process's own pages (USS): where anything kept per download would have to live, as
    children are replaced every WORKER_MAX_TASKS_PER_CHILD tasks."""

    pss: int
    main: int

    def __str__(self) -> str:
        return f"PSS {self.pss / MIB:.1f} MiB, the main process's own {self.main / MIB:.1f} MiB"


def memory(worker: Worker) -> Memory:
    assert worker.proc is not None
    main = psutil.Process(worker.proc.pid)
    procs = [main, *main.children(recursive=True)]
    return Memory(sum(p.memory_full_info().pss for p in procs), main.memory_full_info().uss)


def assert_flat(first: Memory, then: Memory) -> None:
    """What a crowd adds once its first fifth is parked: nothing the main process keeps, and in
    all no more than where each child is between two recycles (a child's own pages grow with
    the tasks it has run, up to WORKER_MAX_TASKS_PER_CHILD). Measured on Redis, PSS and the main
    process's own: 200 -> 1,000 parked 140.4 -> 141.8 and 21.8 -> 22.4 MiB; 1,000 -> 5,000
    141.8 -> 151.5 and 22.4 -> 21.1 MiB; 2,000 -> 10,000 149.4 -> 157.0 and 24.0 -> 20.2 MiB,
    149.1 -> 161.7 and 23.9 -> 22.8 MiB. On RabbitMQ, 1,000 -> 5,000: 140.9 -> 150.8 and
    22.2 -> 21.8 MiB."""
    assert then.main - first.main < 2 * MIB, (str(first), str(then))
    assert then.pss - first.pss < 16 * MIB, (str(first), str(then))


def every_slot_busy(
    client: Celery, worker: Worker, origin: OriginServer, slots: int, key: str
) -> int:
    """Twice `slots` slow ordinary downloads, which all end SUCCESS; returns how many ran at once
    when `slots` of them did (it fails the test if they never did)."""
    batch = [
        submit(
            client,
            worker,
            url=f"{origin.url}/bytes/300000?rate=150000&seed={key}{i}",
            dest=f"ordinary/{key}-{i}.bin",
        )
        for i in range(2 * slots)
    ]
    most = int(wait_for(lambda: _running(batch) == slots and slots, 60, "every slot to be busy"))
    for r in batch:
        assert r.get(timeout=60)["size"] == 300000
    return most


def _running(batch: list[AsyncResult]) -> int:
    return sum(r.state in ("STARTED", "PROGRESS") for r in batch)
