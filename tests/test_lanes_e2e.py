"""The express lane against real workers and a real origin, counted at the origin: an urgent
download starts ahead of a backlog queued before it, and ahead of the downloads parked for its
origin. The same scenarios run on RabbitMQ in tests/test_rabbitmq_e2e.py."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis
from celery import Celery
from celery.result import AsyncResult

from download_client.client import submit, submit_many, submit_stream
from download_client.contract import TASK_NAME
from tests.harness import Worker, wait_for
from tests.server import OriginServer, body_sha256

BACKLOG = 3000
SLOTS = 4
# The slots, plus the messages a worker of 4 slots has already taken from the queue (its
# prefetch), plus one for the turn the queue may have before the lane in the round robin.
AHEAD_BOUND = 2 * SLOTS


def urgent_ahead_of_a_backlog(
    client: Celery, worker: Worker, origin: OriginServer, key: str, purge: Callable[[], None]
) -> None:
    """3,000 downloads queued by a bare producer (half a second each) on a worker of 4 slots, then
    one urgent: at most AHEAD_BOUND of the backlog start between its submission and its
    request, and the backlog is not urgent for having been sent first."""
    slow = f"{origin.url}/bytes/4000?rate=8000&key={key}-b"
    backlog = ({"url": f"{slow}{i}", "dest": f"urgent/{key}-{i}.bin"} for i in range(BACKLOG))
    for _ in submit_stream(client, backlog, queue=worker.queue, announce=False):
        pass
    wait_for(lambda: len(origin.stats.started(f"{key}-b")) >= SLOTS, 60, "the backlog running")
    try:
        sent = time.monotonic()
        url = f"{origin.url}/bytes/3000?seed={key}&key={key}-urgent"
        res = submit(client, url, dest=f"urgent/{key}.bin", queue=worker.queue, urgent=True)
        assert res.get(timeout=120)["sha256"] == body_sha256(3000, key)
        [came] = origin.stats.for_key(f"{key}-urgent")
        between = sum(sent <= at < came.at for at in origin.stats.started(f"{key}-b"))
        print(
            f"\n{between} of the backlog started between the urgent one's submission and its start"
        )
        assert between <= AHEAD_BOUND, f"{between} of the backlog started before the urgent one"
        assert len(origin.stats.started(f"{key}-b")) < BACKLOG / 2  # the backlog was still there
    finally:
        purge()


def urgent_ahead_at_its_origin(
    client: Celery, worker: Worker, origin: OriginServer, key: str
) -> None:
    """An origin of one slot (DOWNLOAD_HOST_CONCURRENCY=1), held by a slow download; three
    downloads park for it, then an urgent one: the urgent one is the next the origin serves."""
    holder = submit(client, f"{origin.url}/bytes/20000?rate=10000&key={key}-h",
                    dest=f"parked/{key}-h.bin", queue=worker.queue)  # fmt: skip
    wait_for(lambda: origin.stats.for_key(f"{key}-h"), 30, "the holder running")
    parked: list[AsyncResult] = []
    for i in range(3):
        url = f"{origin.url}/bytes/1000?key={key}-n{i}"
        parked.append(submit(client, url, dest=f"parked/{key}-{i}.bin", queue=worker.queue))
        wait_for(lambda r=parked[-1]: r.state == "WAITING", 30, "a download parked")
    urgent = submit(client, f"{origin.url}/bytes/1000?key={key}-u", dest=f"parked/{key}-u.bin",
                    queue=worker.queue, urgent=True)  # fmt: skip
    wait_for(lambda: urgent.state == "WAITING", 30, "the urgent one parked")
    for r in [holder, *parked, urgent]:
        r.get(timeout=60)
    with origin.stats.lock:
        after = [r.query["key"] for r in origin.stats.requests if r.query.get("key", "") in
                 {f"{key}-u", *(f"{key}-n{i}" for i in range(3))}]  # fmt: skip
    assert after[0] == f"{key}-u", after


def test_an_urgent_download_starts_ahead_of_a_backlog_queued_before_it(
    client, start_worker, origin, key, redis_server
):
    w = start_worker(concurrency=SLOTS)
    broker = redis.Redis(port=redis_server.port, db=0)
    try:
        urgent_ahead_of_a_backlog(client, w, origin, key, lambda: broker.delete(w.queue))
    finally:
        broker.close()


def test_an_urgent_download_parked_for_its_origin_is_the_next_it_serves(
    client, start_worker, origin, key
):
    w = start_worker(concurrency=2, DOWNLOAD_HOST_CONCURRENCY="1")
    urgent_ahead_at_its_origin(client, w, origin, key)


def test_urgent_and_other_downloads_both_queued_take_turns(client, start_worker, origin, key):
    """40 downloads queued, then 40 urgent ones, on a worker of 2 slots: the first 40 to start
    are not all of one kind (one queue would start all 40 of the first before any urgent one;
    the lane taken first would start all 40 urgent ones first)."""
    w = start_worker(concurrency=2)
    n = 40
    kinds = {}
    for kind in ("n", "u"):
        items = [{"url": f"{origin.url}/bytes/2000?rate=20000&key={key}-{kind}{i}",
                  "dest": f"turns/{key}-{kind}{i}.bin"} for i in range(n)]  # fmt: skip
        kinds[kind] = submit_many(client, items, queue=w.queue, urgent=kind == "u")
    for r in [*kinds["n"], *kinds["u"]]:
        r.get(timeout=120)
    with origin.stats.lock:
        keys = [r.query.get("key", "") for r in origin.stats.requests]
    order = [k[len(key) + 1] for k in keys if k.startswith(f"{key}-")]  # "n" or "u", as started
    first = order[:n]
    assert n / 4 <= first.count("n") <= 3 * n / 4, "".join(order)


def test_a_bare_producer_sends_an_urgent_download_by_naming_the_lane(
    client, start_worker, origin, key
):
    """No client of ours: Celery's own send_task to `<queue>.urgent`, as the contract says."""
    w = start_worker()
    url = f"{origin.url}/bytes/500?seed={key}"
    res = client.send_task(TASK_NAME, kwargs={"url": url, "dest": f"bare/{key}.bin"},
                           queue=f"{w.queue}.urgent")  # fmt: skip
    assert res.get(timeout=60)["sha256"] == body_sha256(500, key)
    assert res.get()["path"] == f"bare/{key}.bin"
