"""Run the soak: start the parts, submit while the chaos driver runs, account for every accepted
download as it ends, then judge and write the report."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psutil
import redis
from celery import Celery
from kombu.entity import Exchange, Queue

from download_client.brokers import rabbitmq_config
from download_client.fleet import queue_depth
from download_client.settings import Settings
from soak.chaos import Chaos
from soak.origin import Outages, RecordingOrigin
from soak.plan import Download, MiB, plan
from soak.report import judge
from tasks.core.disk import MARKER
from tasks.core.storage import LOCKS
from tests.harness import RedisServer, Worker, wait_for, worker_env
from tests.rabbitmq import RabbitServer

TASK = "downloads.fetch"
WORKERS = 2
CHILDREN = 3


@dataclass(frozen=True)
class Size:
    downloads: int
    submit_s: float  # submissions are spread over this long
    chaos_s: float  # the chaos driver runs this long
    outage: tuple[float, float]
    pause: tuple[float, float]
    big: int
    drain_s: float = 600  # how long the last downloads may take once the chaos has stopped
    # SOAK_REDIS_KILLS=1: only Redis crashes (SIGKILL, AOF always), this many, under small plain
    # downloads: the scenario of the fetch's guarantee (2,400 downloads, 40 crashes).
    redis_kills: int = 0
    # The origin's `down=1` paths (soak.origin.Outages): down this long, then up this long.
    origin_down: tuple[float, float] = (5, 5)

    @classmethod
    def from_env(cls) -> Size:
        quick = os.environ.get("SOAK_QUICK") == "1"
        if os.environ.get("SOAK_REDIS_KILLS") == "1":
            return cls(2400, 240, 330, (0.5, 3), (3, 5), 64 * 1024, redis_kills=40)
        size = (
            cls(300, 60, 90, (1, 5), (2, 5), 8 * MiB, origin_down=(20, 10))
            if quick
            else cls(3000, 360, 420, (1, 30), (3, 10), 24 * MiB, origin_down=(90, 45))
        )
        if "SOAK_DOWNLOADS" in os.environ:
            n = int(os.environ["SOAK_DOWNLOADS"])
            scale = n / size.downloads
            size = replace(size, downloads=n, submit_s=size.submit_s * scale,
                           chaos_s=size.chaos_s * scale)  # fmt: skip
        return size


# Shortened where the production defaults would make the soak wait for nothing; the retry budget
# is wider than the cases need, and deliveries are not capped by the chaos' own kills.
SOAK_SETTINGS = {
    "DOWNLOAD_CONNECT_TIMEOUT": "3",
    "DOWNLOAD_READ_TIMEOUT": "3",
    "DOWNLOAD_RETRY_BACKOFF": "0.5",
    "DOWNLOAD_RETRY_BACKOFF_MAX": "5",
    "DOWNLOAD_MAX_RETRIES": "6",
    "DOWNLOAD_MAX_DELIVERIES": "50",
    "DOWNLOAD_SHUTDOWN_GRACE": "10",
    "DOWNLOAD_PROGRESS_INTERVAL": "1",
    "WORKER_MAX_TASKS_PER_CHILD": "150",
}
# SOAK_DISK_MARGIN=<bytes>: the workers run with disk reservations on, that margin kept free.
DISK_MARGIN = os.environ.get("SOAK_DISK_MARGIN", "")
if DISK_MARGIN:
    SOAK_SETTINGS["DOWNLOAD_DISK_MARGIN"] = DISK_MARGIN


@dataclass
class Outcome:
    state: str
    result: Any
    file_ok: bool | None = None


@dataclass
class Books:
    """What became of each accepted download, filled in as each one ends."""

    accepted: dict[str, Download] = field(default_factory=dict)
    submit_retries: int = 0
    ended: dict[str, Outcome] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def task_id(n: int) -> str:
    # One id per download, kept when a submission is retried: a publish that reached Redis but
    # whose answer was lost is the same download, not a second one.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"soak-{n}"))


def submit_all(
    client: Celery, books: Books, downloads: list[Download], origin: str, span: float
) -> None:
    start = time.monotonic()
    for i, d in enumerate(downloads):
        time.sleep(max(0.0, start + span * i / len(downloads) - time.monotonic()))
        while True:
            try:
                client.send_task(TASK, kwargs=d.kwargs(origin), task_id=task_id(d.n), queue="soak")
                break
            except Exception:  # Redis is away: not accepted yet, try again
                books.submit_retries += 1
                time.sleep(0.5)
        with books.lock:
            books.accepted[task_id(d.n)] = d


def account(books: Books, backend_url: str, dl: Path, stop: threading.Event) -> None:
    """Read final states as they appear; check each file against the origin's body, then drop its
    bytes but keep the file (the disk stays small however long the soak runs)."""
    r = redis.Redis.from_url(backend_url)
    while not stop.is_set():
        with books.lock:
            open_ids = [i for i in books.accepted if i not in books.ended]
        try:
            values = r.mget([f"celery-task-meta-{i}" for i in open_ids]) if open_ids else []
        except redis.RedisError:
            values = []
        for tid, raw in zip(open_ids, values, strict=False):
            if raw is None:
                continue
            meta = json.loads(raw)
            if meta["status"] not in ("SUCCESS", "FAILURE"):
                continue
            d = books.accepted[tid]
            outcome = Outcome(meta["status"], meta["result"])
            if outcome.state == "SUCCESS":
                path = dl / d.dest
                outcome.file_ok = path.is_file() and _sha256(path) == d.sha256
                _hollow(path)
            books.ended[tid] = outcome
        stop.wait(1)


def _hollow(path: Path) -> None:
    """Free a checked file's blocks and leave it as it was to a run that looks at it: its size,
    its mtime and its record (an xattr of the inode), so that a copy of the download delivered
    again finds the file and asks the origin whether it changed (a 304), as it would in
    production. Removing it would make that copy fetch the whole body."""
    try:
        st = path.stat()
        os.truncate(path, 0)
        os.truncate(path, st.st_size)  # a hole: no blocks
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    except FileNotFoundError:
        pass


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sample_rss(workers: list[Worker], samples: dict[int, list[int]], stop: threading.Event) -> None:
    while not stop.wait(5):
        for w in workers:
            try:
                pids = w.children() if w.proc and w.proc.poll() is None else []
            except psutil.Error:
                continue
            for pid in pids:
                with contextlib.suppress(psutil.Error):  # it exited since it was listed
                    samples.setdefault(pid, []).append(psutil.Process(pid).memory_info().rss)


def sample_backlog(client: Celery, queue: str, samples: list[int], stop: threading.Event) -> None:
    """Downloads queued (the queue and its woken lane) every 5 s, while the broker answers."""
    while not stop.wait(5):
        with contextlib.suppress(Exception), client.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            samples.append(queue_depth(conn, queue))


@dataclass
class Stack:
    """The parts one soak runs against, all on 127.0.0.1."""

    work: Path
    redis: RedisServer
    client: Celery
    origin: RecordingOrigin
    workers: list[Worker]
    node: RabbitServer | None = None  # the broker when it is RabbitMQ

    @classmethod
    def start(cls, work: Path, outages: Outages, broker: str = "redis") -> Stack:
        (work / "redis").mkdir(parents=True)
        server = RedisServer(work / "redis", persistent=True)
        server.start()
        node, broker_url, backend = None, f"{server.url}/0", f"{server.url}/1"
        if broker == "rabbitmq":
            node = RabbitServer(work / "rabbitmq")
            node.start()
            broker_url = node.url
        client = Celery(broker=broker_url, backend=backend)
        client.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
        # Queues declared as the workers declare them (quorum, topic) when RabbitMQ is the broker.
        settings = Settings.from_env(
            {"CELERY_BROKER_URL": broker_url, "CELERY_RESULT_BACKEND": backend}
        )
        client.conf.update(rabbitmq_config(settings))
        if node is not None:
            _declare_default_queue(client)
        origin = RecordingOrigin(outages)
        origin.start()
        env = worker_env(server.url, work / "dl", CELERY_BROKER_URL=broker_url, **SOAK_SETTINGS)
        workers = [
            Worker(
                env, f"soak{i}", "soak", work / f"soak{i}.log", work / "dl", ["-c", str(CHILDREN)]
            )
            for i in range(WORKERS)
        ]
        for w in workers:
            w.start(client)
        return cls(work, server, client, origin, workers, node)

    def partial_left(self) -> list[str]:
        area = self.work / "dl" / ".partial"
        files = (p for p in area.rglob("*") if p.is_file() and p.name not in (LOCKS, MARKER))
        return sorted(str(p.relative_to(area)) for p in files)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()
        self.origin.stop()
        self.redis.stop()
        if self.node is not None:
            self.node.close()


def _declare_default_queue(client: Celery) -> None:
    """The default queue and its exchange, as they exist once anything is submitted without a
    queue: every worker binds it to the delayed-delivery exchange at start, and without it native
    delayed delivery is off ("Failed to setup delayed delivery")."""
    with client.connection_for_write() as conn:
        exchange = Exchange("celery", "topic")  # type: ignore[no-untyped-call]
        quorum = {"x-queue-type": "quorum"}
        queue = Queue("celery", exchange, "celery", queue_arguments=quorum)  # type: ignore[no-untyped-call]
        queue.declare(channel=conn.default_channel)  # type: ignore[no-untyped-call]


def main(size: Size | None = None, seed: int | None = None) -> dict[str, Any]:
    size = size or Size.from_env()
    seed = int(os.environ.get("SOAK_SEED", "1")) if seed is None else seed
    broker = os.environ.get("SOAK_BROKER", "redis")
    if broker not in ("redis", "rabbitmq"):
        raise SystemExit(f"SOAK_BROKER={broker!r}: expected redis or rabbitmq")
    outages = Outages(*size.origin_down)
    stack = Stack.start(Path(tempfile.mkdtemp(prefix="soak-")), outages, broker)
    books, stop = Books(), threading.Event()
    rss: dict[int, list[int]] = {}
    chaos = Chaos(stack.redis, stack.client, stack.workers, random.Random(seed), size.outage,
                  size.pause, stop_timeout=60, redis_kills=size.redis_kills,
                  node=stack.node)  # fmt: skip
    backend = f"{stack.redis.url}/1"
    _background(account, books, backend, stack.work / "dl", stop)
    _background(sample_rss, stack.workers, rss, stop)
    backlog: list[int] = []
    _background(sample_backlog, stack.client, "soak", backlog, stop)
    downloads = plan(size.downloads, seed, size.big, plain=bool(size.redis_kills),
                     deadline=outages.deadline_s)  # fmt: skip
    submitter = _background(
        submit_all, stack.client, books, downloads, stack.origin.url, size.submit_s
    )
    began = time.monotonic()
    chaos.run(until=began + size.chaos_s)
    submitter.join()
    chaos_end = time.monotonic()
    with contextlib.suppress(AssertionError):  # what is still open is reported as unaccounted
        wait_for(lambda: len(books.ended) == len(books.accepted), size.drain_s, "the last to end")
    timings = {"chaos_s": chaos_end - began, "drain_s": time.monotonic() - chaos_end}
    stop.set()
    partial_left = stack.partial_left()
    stack.stop()
    figures = judge(books=books, ledger=stack.origin.ledger, events=chaos.events, rss=rss,
                    partial_left=partial_left, timings=timings, size=size, seed=seed)  # fmt: skip
    figures["down_origin"]["attempt_budget"] = 1 + int(SOAK_SETTINGS["DOWNLOAD_MAX_RETRIES"])
    if backlog:
        figures["backlog"] = {"median": statistics.median(backlog), "max": max(backlog)}
    figures["work"] = str(stack.work)
    figures["broker"] = broker
    if DISK_MARGIN:
        figures["disk_margin"] = DISK_MARGIN
    if figures["ok"]:
        shutil.rmtree(stack.work, ignore_errors=True)
    return figures


def _background(target: Any, *args: Any) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread
