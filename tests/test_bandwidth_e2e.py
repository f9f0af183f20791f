"""Bandwidth budgets with real workers: three workers on one Redis share one origin's rate (the
bytes of the batch take at least as long as the rate allows, whichever worker runs them),
another origin without a budget is not slowed, and the download says it was held back: in
PROGRESS while it runs, in its result, and in `downloads status`. The benchmark measures how
close to the rate the fleet runs (`python -m bench bandwidth`); this checks the bound a budget
must never break, and leaves speed to it."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

from tests.conftest import submit
from tests.harness import ROOT, wait_for, worker_env
from tests.server import OriginServer

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
    done = subprocess.run(
        [sys.executable, "-m", "download_client.cli", "status", "--queue", queue, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    body: dict = json.loads(done.stdout)
    text = subprocess.run(
        [sys.executable, "-m", "download_client.cli", "status", "--queue", queue],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
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
