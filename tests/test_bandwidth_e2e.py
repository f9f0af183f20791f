"""Bandwidth budgets with real workers: three workers on one Redis share one origin's rate (the
bytes of the batch take at least as long as the rate allows, whichever worker runs them),
another origin without a budget is not slowed, and the download says it was held back: in
PROGRESS while it runs, in its result, and in `downloads status`. The benchmark measures how
close to the rate the fleet runs (`python -m bench bandwidth`); this checks the bound a budget
must never break, and leaves speed to it."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid

import redis

from download_client import records
from tests.conftest import active_pid, submit
from tests.harness import TASK, Worker, cli, wait_for, worker_env
from tests.server import OriginServer, body_sha256

RATE = 1_000_000  # bytes a second, for the whole fleet
SIZE = 1024 * 1024
BATCH = 6


def test_three_workers_share_one_origins_rate_and_say_so(
    start_worker, origin, client, redis_server, tmp_path, flower
) -> None:
    other = OriginServer().start()  # a second origin, its budget lifted by an override
    queue = f"rate-{uuid.uuid4().hex[:6]}"
    rates = {"DOWNLOAD_HOST_RATE": "1M", "DOWNLOAD_HOST_RATES": f"{other.url}=0"}
    workers = [start_worker(queue=queue, concurrency=2, **rates) for _ in range(3)]
    try:
        tag = uuid.uuid4().hex[:6]
        started = time.monotonic()
        batch = [
            submit(client, workers[0], url=f"{origin.url}/bytes/{SIZE}?seed={tag}{i}")
            for i in range(BATCH)
        ]
        # While the batch holds the budget: a download says it is held back as it runs, to
        # pollers and in Flower's task list...
        wait_for(lambda: _throttled(batch), 30, "a running download to report throttled_s")
        wait_for(lambda: _held_in_flower(flower, batch), 30, "Flower to show one held back")
        # ...and one from another origin is not slowed by it.
        free = submit(client, workers[0], url=f"{other.url}/bytes/{4 * SIZE}?seed={tag}")
        assert free.get(timeout=60)["throttled_s"] == 0
        results = [r.get(timeout=120) for r in batch]
        elapsed = time.monotonic() - started
    finally:
        other.stop()
    assert {r["worker"] for r in results} == {w.hostname for w in workers}  # all three shared it
    # Every byte went through the one budget: the batch took at least what its bytes cost at the
    # rate, less the burst the budget lets through and what the last chunks of each body bring.
    spent = BATCH * SIZE / RATE
    assert elapsed >= spent - 0.25 - BATCH * 0.05, (elapsed, spent)
    assert sum(r["throttled_s"] for r in results) > spent / 2
    assert all(r["size"] == SIZE for r in results)

    shown = _status(redis_server, tmp_path, queue)["bandwidth"]
    budget = shown[origin.url]  # the scope is the origin: scheme://host:port
    assert budget["rate"] == RATE and budget["bytes"] >= BATCH * SIZE
    assert other.url not in shown  # no budget there: nothing counted
    assert flower.metric("downloads_bandwidth_limit_bytes_per_second", scope=origin.url) == RATE
    assert flower.metric("downloads_bandwidth_bytes_total", scope=origin.url) >= BATCH * SIZE


def _throttled(results: list) -> str | None:
    for r in results:
        info = r.info if r.state == "PROGRESS" else None
        if isinstance(info, dict) and info.get("throttled_s", 0) > 0:
            return str(r.id)
    return None


def _held_in_flower(flower, results: list) -> bool:
    for r in results:
        info = flower.info(r.id) or {}
        line = json.loads(info.get("result") or "{}") if info.get("state") == "PROGRESS" else {}
        if "by a bandwidth budget" in line.get("progress", ""):
            return True
    return False


def _status(redis_server, tmp_path, queue: str) -> dict:
    env = worker_env(redis_server.url, tmp_path)
    done = cli(env, "status", "--queue", queue, "--json")
    assert done.returncode == 0, done.stderr
    body: dict = json.loads(done.stdout)
    text = cli(env, "status", "--queue", queue).stdout
    assert "bandwidth budgets:" in text and "976.6 KiB/s" in text  # 1M = 10^6 bytes a second
    return body


def test_a_workers_total_paces_its_downloads_from_every_origin(
    start_worker, origin, client, redis_server, tmp_path
) -> None:
    other = OriginServer().start()
    queue = f"wrate-{uuid.uuid4().hex[:6]}"
    w = start_worker(queue=queue, concurrency=2, DOWNLOAD_WORKER_RATE="1M")
    try:
        tag = uuid.uuid4().hex[:6]
        started = time.monotonic()
        pair = [submit(client, w, url=f"{o.url}/bytes/{SIZE}?seed={tag}") for o in (origin, other)]
        results = [r.get(timeout=60) for r in pair]
        elapsed = time.monotonic() - started
    finally:
        other.stop()
    assert elapsed >= 2 * SIZE / RATE - 0.25 - 2 * 0.05, elapsed  # one rate for both origins
    assert all(r["throttled_s"] > 0 for r in results)
    total = _status(redis_server, tmp_path, queue)["bandwidth"][f"worker {w.hostname}"]
    assert total["rate"] == RATE and total["bytes"] >= 2 * SIZE


def test_a_child_killed_mid_body_holds_nothing_back_and_its_download_resumes(
    start_worker, client, redis_server
) -> None:
    # An origin of its own: the session's origin has budgets of other tests running beside.
    origin = OriginServer().start()
    queue = f"krate-{uuid.uuid4().hex[:6]}"
    w = start_worker(queue=queue, concurrency=1, DOWNLOAD_HOST_RATE="1M")
    key = uuid.uuid4().hex[:8]
    url = f"{origin.url}/bytes/{3 * SIZE}?seed={key}&key={key}"
    try:
        res = submit(client, w, url=url, dest=f"{key}.bin")
        wait_for(lambda: _throttled([res]), 30, "the download to be held back")
        os.kill(active_pid(client, w, res.id), signal.SIGKILL)
        # Nothing was reserved ahead: the budget's clock is at most its tolerance and a quantum
        # (20 ms) ahead of now, whoever takes from it next.
        rates = records.bandwidth(redis.Redis.from_url(f"{redis_server.url}/1"))
        assert rates[origin.url]["ahead_s"] <= records.RATE_TOLERANCE_S + 0.1
        got = res.get(timeout=60)
    finally:
        origin.stop()
    assert got["sha256"] == body_sha256(3 * SIZE, key) and got["size"] == 3 * SIZE
    assert got["resumed_from"] > 0 and got["throttled_s"] > 0  # the run after it went on


def test_with_redis_killed_mid_body_the_download_ends_unpaced_and_whole(
    crashable_redis, origin, tmp_path
) -> None:
    """Submitted by a bare Celery app; the budget's Redis is the broker's and the results'."""
    server, bare = crashable_redis
    env = worker_env(server.url, tmp_path / "dl", DOWNLOAD_HOST_RATE="1M")
    w = Worker(env, "rdead", "q", tmp_path / "w.log", tmp_path / "dl", ["-c", "1"]).start(bare)
    try:
        key = uuid.uuid4().hex[:8]
        url = f"{origin.url}/bytes/{3 * SIZE}?seed={key}&key={key}"
        res = bare.send_task(TASK, kwargs={"url": url, "dest": f"{key}.bin"}, queue="q")
        wait_for(lambda: _throttled([res]), 30, "the download to be held back")
        server.kill()
        wait_for(lambda: "bandwidth budget not applied" in w.log(), 30, "the warning")
        server.start()
        got = res.get(timeout=120)
        assert got["sha256"] == body_sha256(3 * SIZE, key)
        assert len(origin.stats.for_key(key)) == 1  # one transfer: the outage cut nothing
    finally:
        assert w.stop(timeout=60) == 0


def test_httpbins_bodies_are_paced_and_a_redirect_is_paced_where_the_body_comes_from(
    start_worker, origin, client, httpbin
) -> None:
    rate = 64 * 1024
    queue = f"hrate-{uuid.uuid4().hex[:6]}"
    w = start_worker(queue=queue, concurrency=3, DOWNLOAD_HOST_RATES=f"{httpbin.url}={rate}")
    tag = uuid.uuid4().hex[:6]
    started = time.monotonic()
    paced = [
        submit(client, w, url=f"{httpbin.url}/range/102400?n={i}", dest=f"{tag}/r{i}.bin")
        for i in range(2)
    ]
    # From httpbin to the loopback origin, which has no budget: the body is not paced.
    away = f"{httpbin.url}/redirect-to?url={origin.url}/bytes/200000%3Fseed%3D{tag}"
    moved = submit(client, w, url=away, dest=f"{tag}/moved.bin").get(timeout=60)
    results = [r.get(timeout=60) for r in paced]
    elapsed = time.monotonic() - started
    assert moved["final_url"].startswith(origin.url) and moved["throttled_s"] == 0
    assert elapsed >= 2 * 102400 / rate - 0.25 - 2 * 0.05, elapsed
    assert all(r["size"] == 102400 and r["throttled_s"] > 0 for r in results)
