"""`python -m bench.brokers`: small downloads per second through one worker (2 children) with
Redis and with RabbitMQ as the broker, in the same run, against the same loopback origin; results
in Redis either way. Private servers on 127.0.0.1 only (the test suite's helpers). Prints a
table and writes .run/bench-brokers.json.

BENCH_BROKER_FILES (300), BENCH_BROKER_ROUNDS (3) and BENCH_BROKER_KIB (16) change the load."""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from celery import Celery

from bench.stack import BENCH_SETTINGS, last_done, rotated, send_all, wait_all
from download_client.client import connect
from download_client.contract import TASK_NAME
from download_client.settings import Settings
from tests.harness import ROOT, RedisServer, Worker, worker_env
from tests.rabbitmq import RabbitServer, installed
from tests.server import OriginServer

FILES = int(os.environ.get("BENCH_BROKER_FILES", "300"))
ROUNDS = int(os.environ.get("BENCH_BROKER_ROUNDS", "3"))
SIZE = int(os.environ.get("BENCH_BROKER_KIB", "16")) * 1024


@contextmanager
def _servers(work: Path) -> Iterator[tuple[RedisServer, RabbitServer, OriginServer]]:
    with ExitStack() as stack:
        (work / "redis").mkdir()
        redis = RedisServer(work / "redis")
        redis.start()
        stack.callback(redis.stop)
        rabbit = RabbitServer(work / "rabbitmq")
        rabbit.start()
        stack.callback(rabbit.close)
        origin = OriginServer().start()
        stack.callback(origin.stop)
        yield redis, rabbit, origin


def _worker(work: Path, name: str, redis: RedisServer, broker: str) -> tuple[Worker, Celery]:
    env = worker_env(redis.url, work / name, CELERY_BROKER_URL=broker, **BENCH_SETTINGS)
    app = connect(Settings.from_env(env))
    w = Worker(env, name, name, work / f"{name}.log", work / name, ["-c", "2"])
    return w.start(app), app


def _round(app: Celery, w: Worker, origin: OriginServer, tag: str) -> float:
    """Files per second: from the first send until the worker stored the last result."""
    kwargs = (
        {"url": f"{origin.url}/bytes/{SIZE}?seed={i}", "dest": f"{tag}/{i}.bin"}
        for i in range(FILES)
    )
    started = time.time()
    results = send_all(app, TASK_NAME, w.queue, kwargs)
    wait_all(results, timeout=600)
    return FILES / (last_done(results) - started)


def measure(work: Path) -> dict[str, Any]:
    rates: dict[str, list[float]] = {"redis": [], "rabbitmq": []}
    with _servers(work) as (redis, rabbit, origin):
        brokers = {"redis": f"{redis.url}/0", "rabbitmq": rabbit.url}
        running = {name: _worker(work, name, redis, url) for name, url in brokers.items()}
        try:
            _round(running["redis"][1], running["redis"][0], origin, "warm-redis")
            _round(running["rabbitmq"][1], running["rabbitmq"][0], origin, "warm-rabbitmq")
            for r in range(ROUNDS):
                for name in rotated(list(rates), r):
                    w, app = running[name]
                    rates[name].append(_round(app, w, origin, f"r{r}"))
        finally:
            for w, _ in running.values():
                w.stop()
    return {
        "files": FILES,
        "bytes_each": SIZE,
        "rounds": ROUNDS,
        "children": 2,
        "files_per_s": rates,
        "median_files_per_s": {k: round(statistics.median(v), 1) for k, v in rates.items()},
    }


def main() -> int:
    if not installed():
        print("rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)")
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-brokers-") as tmp:
        results = measure(Path(tmp))
    out = ROOT / ".run" / "bench-brokers.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{FILES} x {SIZE // 1024} KiB, one worker with 2 children, {ROUNDS} rounds")
    for name, values in results["files_per_s"].items():
        shown = ", ".join(f"{v:.0f}" for v in values)
        print(f"  {name:9} median {results['median_files_per_s'][name]:7.1f} files/s  ({shown})")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
