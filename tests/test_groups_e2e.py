"""Submitter groups against real workers and a real origin, counted at the origin: a group that
submits behind another group's backlog takes turns with it instead of waiting behind it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import redis
from celery import Celery

from download_client.client import submit, submit_many
from download_client.groups import group_queue
from tests.conftest import active_pid
from tests.conftest import submit as send
from tests.harness import Worker, wait_for
from tests.server import OriginServer, body_sha256

BACKLOG = 3000
SLOTS = 4
# B's 20 downloads alternate with A's in the worker's round robin (20), plus the messages a
# worker of 4 slots has already taken (its prefetch) and those running when B is submitted.
INTERLEAVED_BOUND = 40


def a_group_behind_a_backlog(
    client: Celery, worker: Worker, origin: OriginServer, key: str, purge: Callable[[str], None]
) -> int:
    """Group A queues 3,000 downloads (50 ms each at the origin) on a worker of 4 slots, then
    group B, new to the fleet, queues 20: how many of A's start between B's submission and B's
    last request."""
    a, b = f"a-{key[:8]}", f"b-{key[:8]}"
    slow = f"{origin.url}/bytes/2000?stall=0.05&key={key}-a"
    backlog = [{"url": f"{slow}{i}", "dest": f"groups/{key}-a{i}.bin"} for i in range(BACKLOG)]
    submit_many(client, backlog, queue=worker.queue, group=a)
    wait_for(lambda: len(origin.stats.started(f"{key}-a")) >= SLOTS, 60, "A's backlog running")
    try:
        sent = time.monotonic()
        items = [{"url": f"{origin.url}/bytes/1000?seed={key}{i}&key={key}-b{i}",
                  "dest": f"groups/{key}-b{i}.bin"} for i in range(20)]  # fmt: skip
        results = submit_many(client, items, queue=worker.queue, group=b)
        for i, r in enumerate(results):
            assert r.get(timeout=120)["sha256"] == body_sha256(1000, f"{key}{i}")
        last = max(origin.stats.for_key(f"{key}-b{i}")[0].at for i in range(20))
        between = sum(sent <= at <= last for at in origin.stats.started(f"{key}-a"))
        print(f"\n{between} of A's downloads started between B's submission and B's last request")
        assert len(origin.stats.started(f"{key}-a")) < BACKLOG / 2  # A's backlog was still there
        return between
    finally:
        purge(group_queue(worker.queue, a))


def a_group_behind_a_parked_backlog(
    client: Celery, workers: list[Worker], origin: OriginServer, key: str,
    purge: Callable[[str], None],
) -> int:  # fmt: skip
    """3 workers of 16 slots against one origin answering in 1 s, 8 slots there fleet-wide (the
    default cap): group A's 3,000 downloads park for it; then group B queues 20. How many of A's
    requests arrive between B's submission and B's last request."""
    a, b = f"a-{key[:8]}", f"b-{key[:8]}"
    queue = workers[0].queue
    slow = f"{origin.url}/bytes/2000?stall=1&key={key}-a"
    backlog = [{"url": f"{slow}{i}", "dest": f"parked/{key}-a{i}.bin"} for i in range(BACKLOG)]
    submit_many(client, backlog, queue=queue, group=a)
    wait_for(lambda: len(origin.stats.started(f"{key}-a")) >= 8, 60, "A's backlog running")
    try:
        sent = time.monotonic()
        items = [{"url": f"{origin.url}/bytes/1000?seed={key}{i}&stall=1&key={key}-b{i}",
                  "dest": f"parked/{key}-b{i}.bin"} for i in range(20)]  # fmt: skip
        results = submit_many(client, items, queue=queue, group=b)
        for i, r in enumerate(results):
            assert r.get(timeout=180)["sha256"] == body_sha256(1000, f"{key}{i}")
        last = max(origin.stats.for_key(f"{key}-b{i}")[0].at for i in range(20))
        between = sum(sent <= at <= last for at in origin.stats.started(f"{key}-a"))
        print(f"\n{between} of A's requests arrived between B's submission and B's last request")
        return between
    finally:
        purge(a)


def test_a_group_submitted_behind_another_groups_backlog_takes_turns_with_it(
    client, start_worker, origin, key, redis_server
):
    w = start_worker(concurrency=SLOTS)
    broker = redis.Redis(port=redis_server.port, db=0)
    try:
        between = a_group_behind_a_backlog(client, w, origin, key, broker.delete)
    finally:
        broker.close()
    assert between <= INTERLEAVED_BOUND, f"{between} of A's started before B's last"


def test_a_worker_started_after_a_group_was_announced_consumes_its_queue(
    client, start_worker, origin, key
):
    """The group's announcement went out before this worker existed: it reads the group queues
    from Redis when its consumer starts."""
    queue = f"late-{key[:8]}"
    url = f"{origin.url}/bytes/700?seed={key}"
    res = submit(client, url, dest=f"groups/{key}.bin", queue=queue, group="late")
    start_worker(queue=queue)
    assert res.get(timeout=60)["sha256"] == body_sha256(700, key)


def test_a_group_parked_behind_another_groups_backlog_at_a_busy_origin_takes_turns(
    client, start_worker, origin, key, redis_server
):
    cap = {"DOWNLOAD_HOST_CONCURRENCY": "8"}  # the default, which the other tests turn off
    first = start_worker(concurrency=16, **cap)
    workers = [first, *(start_worker(queue=first.queue, concurrency=16, **cap) for _ in range(2))]
    broker = redis.Redis(port=redis_server.port, db=0)
    ledger = redis.Redis(port=redis_server.port, db=1)

    def purge(group: str) -> None:
        broker.delete(group_queue(first.queue, group))
        forget_parked(ledger, group)

    try:
        between = a_group_behind_a_parked_backlog(client, workers, origin, key, purge)
    finally:
        broker.close()
        ledger.close()
    assert between <= INTERLEAVED_BOUND, f"{between} of A's arrived before B's last"


def forget_parked(ledger: redis.Redis, group: str) -> None:
    """Drop a group's parked downloads at every origin (the test is done with them)."""
    for key in ledger.scan_iter(match=f"downloads:origin:*:parked-{group}"):
        ledger.delete(key)
    for key in ledger.scan_iter(match="downloads:origin:*:groups"):
        ledger.zrem(key, group)


def test_a_groups_cap_holds_across_the_fleet_and_other_groups_run_meanwhile(
    start_worker, client, origin, key
):
    """DOWNLOAD_GROUP_LIMITS of 2 for one group, 3 workers of 2 slots: counted at the origin, at
    most 2 of its downloads at once; another group's download is not held back."""
    group = f"capped-{key[:8]}"
    env = {"DOWNLOAD_GROUP_LIMITS": f"{group}=2"}
    fleet = [start_worker(queue=f"gcap-{key[:8]}", **env) for _ in range(3)]
    slow = [
        send(client, fleet[i % 3], group=group, dest=f"{key}/{i}.bin",
               url=f"{origin.url}/bytes/40000?seed={key}{i}&key={key}-{i}&rate=40000")
        for i in range(8)
    ]  # fmt: skip
    other = send(client, fleet[0], group="other", dest=f"{key}/other.bin",
                   url=f"{origin.url}/bytes/100?seed=o")  # fmt: skip
    assert other.get(timeout=30)["waited_s"] == 0
    results = [r.get(timeout=120) for r in slow]
    assert origin.stats.most_at_once(f"{key}-") == 2
    assert all(r["attempts"] == 1 for r in results)  # waiting is not an attempt
    assert sum(1 for r in results if r["waited_s"] > 0) >= 5
    assert all(r["sha256"] == body_sha256(40000, f"{key}{i}") for i, r in enumerate(results))


def test_a_killed_child_gives_its_group_slot_back(start_worker, client, origin, key):
    group = f"one-{key[:8]}"
    # One delivery: the killed holder is not run again, so only its lease can give the slot back.
    fleet = [start_worker(queue=f"gkill-{key[:8]}", DOWNLOAD_GROUP_LIMITS=f"{group}=1",
                          DOWNLOAD_MAX_DELIVERIES="1") for _ in range(2)]  # fmt: skip
    holder = send(client, fleet[0], group=group, dest=f"{key}/h.bin",
                    url=f"{origin.url}/bytes/400000?seed={key}&key={key}-h&rate=20000")  # fmt: skip
    wait_for(lambda: holder.state == "PROGRESS", 30, "the holder to run")
    waiter = send(client, fleet[1], group=group, dest=f"{key}/w.bin",
                    url=f"{origin.url}/bytes/100?seed={key}&key={key}-w")  # fmt: skip
    wait_for(lambda: waiter.state == "WAITING", 30, "the waiter to park")
    assert waiter.info["reason"] == "group" and waiter.info["group"] == group
    runner = next(w for w in fleet if holder.id in _active(client, w))
    os.kill(active_pid(client, runner, holder.id), signal.SIGKILL)
    killed = time.monotonic()
    assert waiter.get(timeout=60)["size"] == 100  # back by the lease (10 s) and the sweep
    [asked] = origin.stats.for_key(f"{key}-w")
    assert asked.at > killed  # not before the holder died
    wait_for(lambda: holder.state == "FAILURE", 30, "the holder to fail: one delivery only")


def _active(client: Celery, worker: Worker) -> list[str]:
    replies = client.control.inspect([worker.hostname], timeout=1).active() or {}
    return [t["id"] for t in replies.get(worker.hostname, [])]


def test_each_groups_queued_parked_and_running_downloads_are_on_flowers_metrics(
    flower, start_worker, client, origin, key
):
    """A capped group (1 at once) with one running and two parked, and a group whose queue no
    worker serves yet with three queued: /metrics counts each, per group."""
    group, idle = f"m-{key[:8]}", f"idle-{key[:8]}"
    w = start_worker(queue=f"gm-{key[:8]}", DOWNLOAD_GROUP_LIMITS=f"{group}=1")
    holder = send(client, w, group=group, dest=f"{key}/h.bin",
                  url=f"{origin.url}/bytes/400000?seed={key}&key={key}-h&rate=40000")  # fmt: skip
    wait_for(lambda: holder.state == "PROGRESS", 30, "the holder to run")
    waiters = [send(client, w, group=group, dest=f"{key}/w{i}.bin",
                    url=f"{origin.url}/bytes/100?seed={key}{i}") for i in range(2)]  # fmt: skip
    wait_for(lambda: all(r.state == "WAITING" for r in waiters), 30, "the waiters to park")
    submit_many(client, [f"{origin.url}/bytes/1?n={i}" for i in range(3)],
                queue=f"nobody-{key[:8]}", group=idle)  # fmt: skip
    assert flower.metric("downloads_group_running", group=group) == 1
    assert flower.metric("downloads_group_parked", group=group) == 2
    assert flower.metric("downloads_group_queued", group=idle) == 3
    for r in [holder, *waiters]:
        r.get(timeout=60)
    assert flower.metric("downloads_group_parked", group=group) in (0, None)
    shown = flower.wait_state(holder.id, "SUCCESS")  # Flower shows the group with the arguments
    assert f"'group': '{group}'" in shown["kwargs"], shown["kwargs"]
