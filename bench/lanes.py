"""The express lane's share: a worker of 4 slots with as many urgent downloads queued as
non-urgent ones, the non-urgent sent first, all from one origin answering after 50 ms. While
both are backlogged (the first half of the completions), which share of the starts went to the
non-urgent? Against the same downloads all sent to the queue itself (one FIFO, the peer), in the
same run; on Redis, and on RabbitMQ where rabbitmq-server is installed. `python -m bench lanes`
measures this part alone and redraws the report."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC
from pathlib import Path
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from bench.config import KIB, Config
from bench.delayed import DelayedOrigin
from bench.stack import BENCH_SETTINGS, Stack, wait_all
from bench.stats import fmt, summary
from download_client.client import connect, submit_many
from download_client.settings import Settings
from tests import rabbitmq
from tests.harness import Worker, worker_env

SLOTS = 4
TTFB_MS = 50
BODY = 64 * KIB
MODES = ("express lane", "one queue (peer)")
ALONE = " Measured on its own (`python -m bench lanes`), after the run of the parts above."


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    n, rounds = (100, 1) if cfg.quick else (400, 3)
    origin = DelayedOrigin()
    brokers: dict[str, Any] = {}
    try:
        with _redis_worker(stack) as (app, w):
            brokers["redis"] = _measure(app, w, origin, n, rounds)
        if rabbitmq.installed():
            with _rabbitmq_worker(stack) as (app, w):
                brokers["rabbitmq"] = _measure(app, w, origin, n, rounds)
    finally:
        origin.stop()
    return {"each": n, "slots": SLOTS, "ttfb_ms": TTFB_MS, "bytes": BODY, "rounds": rounds,
            "brokers": brokers}  # fmt: skip


@contextmanager
def _redis_worker(stack: Stack) -> Iterator[tuple[Celery, Worker]]:
    w = stack.worker("lanes", WORKER_CONCURRENCY=str(SLOTS))
    try:
        yield stack.client, w
    finally:
        stack.stop_worker(w)


@contextmanager
def _rabbitmq_worker(stack: Stack) -> Iterator[tuple[Celery, Worker]]:
    node = rabbitmq.RabbitServer(Path(tempfile.mkdtemp(dir=stack.work, prefix="rabbitmq-")))
    node.start()
    ddir = stack.work / "downloads-lanes-rabbitmq"
    env = worker_env(stack.redis.url, ddir, CELERY_BROKER_URL=node.url, **BENCH_SETTINGS,
                     WORKER_CONCURRENCY=str(SLOTS))  # fmt: skip
    app = connect(Settings.from_env(env))
    w = Worker(env, "lanes-rabbitmq", "lanes", stack.work / "lanes-rabbitmq.log", ddir, [])
    try:
        yield app, w.start(app)
    finally:
        w.stop()
        node.close()


def _measure(app: Celery, w: Worker, origin: DelayedOrigin, n: int, rounds: int) -> dict[str, Any]:
    base = origin.url(TTFB_MS, BODY)
    warm = [{"url": f"{origin.url(0, BODY)}/w{i}", "dest": f"warm/{i}"} for i in range(SLOTS)]
    wait_all(submit_many(app, warm, queue=w.queue), timeout=120)
    shares: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode in MODES:
            plain = submit_many(app, _items(base, f"{mode[0]}{r}n", n), queue=w.queue)
            urgent = submit_many(app, _items(base, f"{mode[0]}{r}u", n), queue=w.queue,
                                 urgent=mode == MODES[0])  # fmt: skip
            wait_all([*plain, *urgent], timeout=900)
            shares[mode].append(_plain_share(plain, urgent, n))
    return {"non_urgent_share": {mode: summary(s) for mode, s in shares.items()}}


def _items(base: str, name: str, n: int) -> list[dict[str, str]]:
    return [{"url": f"{base}/{name}{i}", "dest": f"lanes/{name}{i}"} for i in range(n)]


def _plain_share(plain: list[AsyncResult], urgent: list[AsyncResult], n: int) -> float:
    """The non-urgent share of the first `n` downloads done: while both were backlogged."""
    done = sorted([(_done_at(r), "n") for r in plain] + [(_done_at(r), "u") for r in urgent])
    return sum(kind == "n" for _, kind in done[:n]) / n


def _done_at(r: AsyncResult) -> float:
    done = r.date_done
    return float((done if done.tzinfo else done.replace(tzinfo=UTC)).timestamp())


def render(lanes: Mapping[str, Any]) -> str:
    lines = [
        "## 8. The express lane's share",
        "",
        f"A worker of {lanes['slots']} slots; {lanes['each']} non-urgent downloads sent, then "
        f"{lanes['each']} urgent ones ({lanes['bytes'] // KIB} KiB each, one origin answering "
        f"after {lanes['ttfb_ms']} ms). The share of the first {lanes['each']} completions (while "
        "both kinds were queued) that went to the non-urgent downloads: with the express lane, "
        "and with the same downloads all sent to the queue itself (one FIFO). Medians (min-max) "
        f"of {lanes['rounds']} rounds.{ALONE if lanes.get('alone') else ''}",
        "",
        "| broker | express lane | one queue (peer) |",
        "|---|---|---|",
    ]
    for broker, figures in lanes["brokers"].items():
        s = figures["non_urgent_share"]
        lines.append(f"| {broker} | {fmt(s[MODES[0]], 2)} | {fmt(s[MODES[1]], 2)} |")
    return "\n".join(lines) + "\n"
