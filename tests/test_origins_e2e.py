"""Per-origin limits and pauses across a fleet: three worker processes with different hostnames
on one Redis and one queue, and an origin that records every request's span. Counted at the
origin: the most requests at once, and the requests inside a pause."""

from __future__ import annotations

import os
import signal
import time
from urllib.parse import quote

import pytest
from celery import Celery

from tests.conftest import active_pid, submit
from tests.harness import TASK, RedisServer, Worker, free_port, wait_for, worker_env
from tests.netns import NAME, Hosts
from tests.server import OriginServer, body_sha256


def _fleet(start_worker, queue: str, **env: str) -> list:
    return [start_worker(queue=queue, **env) for _ in range(3)]


def _active(client, worker) -> list[str]:
    replies = client.control.inspect([worker.hostname], timeout=1).active() or {}
    return [t["id"] for t in replies.get(worker.hostname, [])]


@pytest.fixture
def other_origin():
    o = OriginServer().start()
    yield o
    o.stop()


def test_the_cap_holds_at_the_origin_and_other_origins_run_meanwhile(
    start_worker, client, origin, other_origin, key
):
    fleet = _fleet(start_worker, f"cap-{key[:8]}", DOWNLOAD_HOST_CONCURRENCY="2")
    slow = [
        submit(
            client,
            fleet[i % 3],
            url=f"{origin.url}/bytes/40000?seed={key}{i}&key={key}-{i}&rate=40000",
            dest=f"{key}/{i}.bin",
        )
        for i in range(8)
    ]
    quick = submit(client, fleet[0], url=f"{other_origin.url}/bytes/100?seed=q",
                   dest=f"{key}/quick.bin")  # fmt: skip
    assert quick.get(timeout=30)["waited_s"] == 0  # another origin: not held back
    results = [r.get(timeout=120) for r in slow]
    assert origin.stats.most_at_once(f"{key}-") == 2
    assert all(r["attempts"] == 1 for r in results)  # waiting is not an attempt
    assert sum(1 for r in results if r["waited_s"] > 0) >= 5
    assert all(r["sha256"] == body_sha256(40000, f"{key}{i}") for i, r in enumerate(results))
    assert quick.get()["size"] == 100 and not slow[-1].get()["skipped"]


def test_a_killed_child_gives_its_slot_back(start_worker, client, origin, key):
    # One delivery: the killed holder is not run again, so only its lease can give the slot back.
    fleet = _fleet(
        start_worker, f"kill-{key[:8]}", DOWNLOAD_HOST_CONCURRENCY="1", DOWNLOAD_MAX_DELIVERIES="1"
    )
    holder = submit(client, fleet[0], url=f"{origin.url}/bytes/400000?seed={key}&key={key}-h"
                    "&rate=20000", dest=f"{key}/h.bin")  # fmt: skip
    wait_for(lambda: holder.state == "PROGRESS", 30, "the holder to run")
    waiter = submit(client, fleet[1], url=f"{origin.url}/bytes/100?seed={key}&key={key}-w",
                    dest=f"{key}/w.bin")  # fmt: skip
    wait_for(lambda: waiter.state == "WAITING", 30, "the waiter to park")
    runner = next(w for w in fleet if holder.id in _active(client, w))
    os.kill(active_pid(client, runner, holder.id), signal.SIGKILL)
    killed = time.monotonic()
    # Back by the lease (10 s) and the sweep, or at once when the message comes back and is
    # refused as poison (one delivery): not by the holder's end, which never comes. The
    # deadline is generous; how soon a lease comes back is tests/test_budgets.py's business.
    assert waiter.get(timeout=60)["size"] == 100
    spans = [
        (
            r.query["key"][-1],
            round(r.at - killed, 2),
            round(r.end - killed, 2),
            r.headers.get("Range"),
        )
        for r in origin.stats.requests
        if r.query.get("key", "").startswith(f"{key}-")
    ]
    # The waiter asked only once the holder was dead (the origin may see the dead holder's
    # connection close a moment later than that).
    assert [s for s in spans if s[0] == "w" and s[1] < 0] == [], spans
    assert [s for s in spans if s[0] == "h" and s[1] > 0] == [], spans
    wait_for(lambda: holder.state == "FAILURE", 30, "the holder to fail: one delivery only")


def test_a_pause_holds_for_every_worker(flower, start_worker, client, other_origin, key):
    origin = other_origin  # its own origin: in-flight counts are per origin
    fleet = _fleet(start_worker, f"pause-{key[:8]}", DOWNLOAD_HOST_CONCURRENCY="4",
                   DOWNLOAD_RETRY_BACKOFF_MAX="10")  # fmt: skip
    first = submit(client, fleet[0], url=f"{origin.url}/bytes/100?seed={key}&key={key}-p"
                   "&flaky=1&fail=429&retry_after=4", dest=f"{key}/p.bin")  # fmt: skip
    wait_for(lambda: origin.stats.for_key(f"{key}-p"), 30, "the 429")
    paused_at = origin.stats.for_key(f"{key}-p")[0].at
    others = [
        submit(
            client,
            fleet[i % 3],
            url=f"{origin.url}/bytes/100?seed={key}{i}&key={key}-o{i}",
            dest=f"{key}/o{i}.bin",
        )
        for i in range(9)
    ]
    results = [r.get(timeout=60) for r in others]
    assert first.get(timeout=60)["attempts"] == 2
    inside = [
        r for r in origin.stats.requests
        if r.query.get("key", "").startswith(f"{key}-") and paused_at < r.at < paused_at + 3.9
    ]  # fmt: skip
    assert inside == []
    assert all(r["attempts"] == 1 and r["waited_s"] > 0 for r in results)
    labels = {"origin": origin.url + ("" if origin.url.count(":") == 2 else ":80")}
    assert flower.metric("downloads_origin_pauses_total", **labels) >= 1
    assert flower.metric("downloads_origin_deferrals_total", **labels) >= 9
    assert flower.metric("downloads_origin_in_flight", **labels) == 0


def test_a_redis_outage_in_the_middle_loses_nothing_and_grants_nothing_twice(tmp_path, origin, key):
    from celery import Celery

    from tests.harness import RedisServer
    from tests.test_delivery_e2e import _worker

    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    client = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    client.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    fleet = [_worker(server, client, tmp_path, f"o{i}", DOWNLOAD_HOST_CONCURRENCY="2")
             for i in range(3)]  # fmt: skip
    try:
        res = [
            submit(
                client,
                fleet[i % 3],
                url=f"{origin.url}/bytes/60000?seed={key}{i}&key={key}-r{i}&rate=30000",
                dest=f"r{i}.bin",
            )
            for i in range(6)
        ]
        wait_for(lambda: sum(r.state == "PROGRESS" for r in res) == 2, 30, "two to run")
        server.kill()
        time.sleep(4)  # the outage itself, not a synchronisation
        server.start()
        assert all(r.get(timeout=120)["size"] == 60000 for r in res)
        assert origin.stats.most_at_once(f"{key}-r") <= 2
    finally:
        for w in fleet:
            w.stop()
        server.stop()


@pytest.mark.skipif(not Hosts.available(), reason="no network namespaces here (needs root)")
def test_the_cap_holds_across_separate_hosts(tmp_path, key):
    """Three workers in three network namespaces (separate hosts, each with its own address),
    one origin reached by one name from all of them, the cap counted at the origin. One slot
    each, so that the cap's two first holders are on two hosts (a worker that releases a slot
    is the first to take the download it wakes)."""
    hosts = Hosts(3, "dlh").create()
    server = RedisServer(tmp_path, persistent=False, also_bind=tuple(hosts.root_side))
    server.start()
    port = free_port()
    servers = [OriginServer(host=a, port=port).start() for a in hosts.root_side]
    for o in servers[1:]:
        o.stats = servers[0].stats  # one origin, three doors
    client = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    client.conf.update(accept_content=["json"])
    fleet = []
    try:
        for i, ns in enumerate(hosts.names):
            env = worker_env(f"redis://{hosts.root_side[i]}:{server.port}", tmp_path / f"dl{i}",
                             DOWNLOAD_HOST_CONCURRENCY="2")  # fmt: skip
            w = Worker(env, f"host{i}", "fleet", tmp_path / f"host{i}.log", tmp_path / f"dl{i}",
                       ["-c", "1"])  # fmt: skip
            w.cmd = ["ip", "netns", "exec", ns, *w.cmd]
            fleet.append(w.start(client))
        res = [
            client.send_task(
                TASK,
                kwargs={
                    "url": f"http://{NAME}:{port}/bytes/40000?seed={key}{i}&key={key}-{i}&rate=40000",
                    "dest": f"{i}.bin",
                },
                queue="fleet",
            )
            for i in range(9)
        ]
        assert all(r.get(timeout=120)["size"] == 40000 for r in res)
        stats = servers[0].stats
        assert stats.most_at_once(f"{key}-") == 2
        peers = {r.peer for r in stats.requests if r.query.get("key", "").startswith(key)}
        assert len(peers) >= 2 and peers <= {f"10.213.{i + 1}.2" for i in range(3)}
    finally:
        for w in fleet:
            w.stop()
        for o in servers:
            o.stop()
        server.stop()
        hosts.remove()


def test_a_redirect_takes_its_slot_at_the_origin_it_lands_on(
    start_worker, client, origin, other_origin, key
):
    """Cap 1 everywhere. A download from A redirected to B gives A's slot back at the hop: a
    second download from A runs meanwhile, and a download from B waits for the redirected one."""
    fleet = _fleet(start_worker, f"hop-{key[:8]}", DOWNLOAD_HOST_CONCURRENCY="1")
    landing = f"{other_origin.url}/bytes/60000?seed={key}b&key={key}-b1&rate=30000"
    hop = submit(client, fleet[0], url=f"{origin.url}/bytes/1?key={key}-a0&redirect=1"
                 f"&to={quote(landing, safe='')}", dest=f"{key}/hop.bin")  # fmt: skip
    wait_for(lambda: other_origin.stats.for_key(f"{key}-b1"), 30, "the redirected request")
    from_a = submit(client, fleet[1], url=f"{origin.url}/bytes/100?seed={key}&key={key}-a1",
                    dest=f"{key}/a.bin")  # fmt: skip
    from_b = submit(client, fleet[2], url=f"{other_origin.url}/bytes/100?seed={key}&key={key}-b2",
                    dest=f"{key}/b.bin")  # fmt: skip
    assert from_a.get(timeout=30)["waited_s"] == 0
    assert hop.get(timeout=60)["size"] == 60000
    assert from_b.get(timeout=60)["waited_s"] > 0
    landed = other_origin.stats.for_key(f"{key}-b1")[0]
    assert origin.stats.for_key(f"{key}-a1")[0].at < landed.end  # A was free during the hop
    assert other_origin.stats.for_key(f"{key}-b2")[0].at >= landed.end  # B was not
