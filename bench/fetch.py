# mypy: allow-untyped-calls
"""The reliable fetch's costs (`python -m bench.fetch`, BENCH_QUICK=1 for fewer samples): how
soon an idle consumer starts a new message, and how many Redis commands an idle consumer sends,
for kombu's own Redis transport and the worker's (worker/redis_transport.py); then the same for
a real idle worker (send_task to the request reaching the origin). Written to
docs/bench-fetch.md."""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.connection import Connection
from kombu.entity import Exchange, Queue
from kombu.transport import redis as kombu_redis

from tests.harness import ROOT, RedisServer, Worker, wait_for, worker_env
from tests.server import OriginServer
from worker import redis_transport

QUICK = os.environ.get("BENCH_QUICK") == "1"
SAMPLES = 10 if QUICK else 40
IDLE_S = 5.0 if QUICK else 20.0


def _commands(r: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = r.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


def _idle_rate(r: redis.Redis, seconds: float) -> tuple[float, dict[str, float]]:
    """Commands per second Redis served while only the idle consumer used it."""
    r.config_resetstat()
    time.sleep(seconds)
    calls = _commands(r)
    calls["info"] = calls.get("info", 0) - 1  # this read
    calls["config|resetstat"] = 0
    per_s = {k: v / seconds for k, v in calls.items() if v > 0}
    return sum(per_s.values()), per_s


def consumer_figures(server: RedisServer, transport: type, priority: int) -> dict[str, Any]:
    """A kombu consumer on its own thread; messages published at random moments while it is
    idle; the time from publish to its callback."""
    name = f"bench-{transport.__module__.split('.')[0]}-{priority}"
    queue = Queue(name, Exchange(name), name)
    url = f"{server.url}/2"
    got = threading.Event()
    received: list[float] = []
    stop = threading.Event()

    def on_message(body: Any, message: Any) -> None:
        received.append(time.perf_counter())
        message.ack()
        got.set()

    conn = Connection(url, transport=transport)

    def consume() -> None:
        with conn.Consumer(queue, callbacks=[on_message]):
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    conn.drain_events(timeout=1)

    with Connection(url) as pub, pub.Producer() as producer:
        producer.publish({}, exchange=queue.exchange, routing_key=name, declare=[queue])
        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        assert got.wait(10)
        rng, latencies = random.Random(1), []
        for _ in range(SAMPLES):
            got.clear()
            time.sleep(rng.uniform(1.2, 2.2))  # idle: the consumer is waiting
            sent = time.perf_counter()
            producer.publish({}, exchange=queue.exchange, routing_key=name, priority=priority)
            assert got.wait(10)
            latencies.append((received[-1] - sent) * 1000)
        rate, by_command = _idle_rate(redis.Redis(port=server.port), IDLE_S)
        stop.set()
        thread.join(5)
    conn.release()
    return {
        "median_ms": statistics.median(latencies),
        "p90_ms": sorted(latencies)[int(len(latencies) * 0.9) - 1],
        "max_ms": max(latencies),
        "idle_commands_per_s": rate,
        "idle_by_command": by_command,
    }


def worker_figures(server: RedisServer, work: Path) -> dict[str, Any]:
    """A real worker (1 child), idle between downloads: send_task to the origin's request."""
    origin = OriginServer().start()
    client = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    client.conf.update(accept_content=["json"])
    env = worker_env(server.url, work / "dl")
    worker = Worker(env, "fetchbench", "fetchbench", work / "w.log", work / "dl", ["-c", "1"])
    worker.start(client)
    try:
        rng, latencies = random.Random(2), []
        for n in range(SAMPLES):
            time.sleep(rng.uniform(1.2, 2.2))
            before = len(origin.stats.requests)
            sent = time.monotonic()
            kwargs = {"url": f"{origin.url}/bytes/10/b{n}", "dest": f"b{n}"}
            client.send_task("downloads.fetch", queue="fetchbench", kwargs=kwargs)
            wait_for(lambda: len(origin.stats.requests) > before, 10, "the request")  # noqa: B023
            latencies.append((origin.stats.requests[before].at - sent) * 1000)
        time.sleep(3)
        rate, by_command = _idle_rate(redis.Redis(port=server.port), IDLE_S)
    finally:
        worker.stop()
        origin.stop()
    return {
        "median_ms": statistics.median(latencies),
        "max_ms": max(latencies),
        "idle_commands_per_s": rate,
        "idle_by_command": by_command,
    }


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-fetch-"))
    server = RedisServer(work, persistent=True)
    server.start()
    try:
        rows = {
            "kombu's transport (BRPOP)": consumer_figures(server, kombu_redis.Transport, 0),
            "worker's transport": consumer_figures(server, redis_transport.Transport, 0),
            "worker's transport, priority 5 message": consumer_figures(
                server, redis_transport.Transport, 5
            ),
        }
        real = worker_figures(server, work)
        version = redis.Redis(port=server.port).info("server")["redis_version"]
    finally:
        server.stop()
    lines = [
        "# The reliable fetch: pickup latency and idle load",
        "",
        f"`python -m bench.fetch` ({'BENCH_QUICK=1, ' if QUICK else ''}{SAMPLES} samples each; "
        f"Redis {version} with `appendfsync always`, on this machine). A message is published "
        "at a random moment 1.2-2.2 s after the consumer went idle; latency is publish to the "
        "consumer's callback. Idle load: Redis's own command counts over "
        f"{IDLE_S:.0f} s with only the idle consumer connected.",
        "",
        "| consumer | median ms | p90 ms | max ms | idle Redis commands/s | of which |",
        "|---|---|---|---|---|---|",
    ]
    for name, f in rows.items():
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(f["idle_by_command"].items()))
        lines.append(f"| {name} | {f['median_ms']:.1f} | {f['p90_ms']:.1f} | "
                     f"{f['max_ms']:.1f} | {f['idle_commands_per_s']:.1f} | {top} |")  # fmt: skip
    top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(real["idle_by_command"].items()))
    lines += [
        "",
        "A real worker (one child, events on), idle between downloads: `send_task` to the "
        f"download's request at the origin, median {real['median_ms']:.1f} ms (max "
        f"{real['max_ms']:.1f} ms); idle, it sends {real['idle_commands_per_s']:.1f} Redis "
        f"commands/s ({top}).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    (ROOT / "docs" / "bench-fetch.md").write_text(text)


if __name__ == "__main__":
    main()
