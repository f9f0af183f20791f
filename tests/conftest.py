"""Real parts for the tests: a private redis-server on a free port, the loopback origin, and real
`celery -A worker worker` processes. Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from tests.harness import (
    TASK,
    RedisServer,
    Worker,
    wait_for,
    worker_env,
)
from tests.server import OriginServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_db(redis_server: RedisServer) -> Iterator[Callable[[int], redis.Redis]]:
    """A database of the private Redis for an in-process test, flushed before and after it."""
    opened: list[redis.Redis] = []

    def db(number: int) -> redis.Redis:
        c = redis.Redis.from_url(f"{redis_server.url}/{number}")
        c.flushdb()
        opened.append(c)
        return c

    yield db
    for c in opened:
        c.flushdb()
        c.close()


@pytest.fixture
def crashable_redis(tmp_path: Path) -> Iterator[tuple[RedisServer, Celery]]:
    """A Redis of its own, to kill and start again, with the persistence compose runs
    (appendonly, appendfsync always), and a bare Celery app on it."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    client = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    client.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    yield server, client
    server.stop()


@pytest.fixture(scope="session")
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def httpbin() -> Iterator[Any]:
    """httpbin as an origin (redirects, encodings, ETags, auth, slow bodies) on 127.0.0.1."""
    from tests.httpbin_origin import HttpbinServer

    server = HttpbinServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(redis_server: RedisServer) -> Celery:
    """A plain Celery client that knows nothing of this project: it submits by name."""
    app = Celery(broker=f"{redis_server.url}/0", backend=f"{redis_server.url}/1")
    app.conf.update(accept_content=["json"], task_serializer="json", result_serializer="json")
    return app


@pytest.fixture(scope="session")
def start_worker(
    redis_server: RedisServer, client: Celery, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Worker]]:
    """Start a worker with setting overrides; stopped at the end of the session."""
    started: list[Worker] = []

    def start(
        download_dir: Path | None = None,
        extra: list[str] | None = None,
        queue: str | None = None,
        concurrency: int | None = 2,
        **overrides: str,
    ) -> Worker:
        name = f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        ddir = download_dir or tmp_path_factory.mktemp(f"downloads-{name}")
        env = worker_env(redis_server.url, ddir, **overrides)
        logs = tmp_path_factory.mktemp("logs")
        # None: no -c, so the worker sizes its pool from WORKER_CONCURRENCY.
        extra = [*(extra or []), *(["-c", str(concurrency)] if concurrency else [])]
        worker = Worker(env, name, queue or name, logs / f"{name}.log", ddir, extra)
        started.append(worker)
        return worker.start(client)

    yield start
    for w in started:  # all warm shutdowns at once, then wait for each
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in started:
        w.stop()


@pytest.fixture(scope="session")
def worker(start_worker: Callable[..., Worker]) -> Worker:
    """The shared default worker on the default queue: prefork, 2 children, loopback allowed,
    short timeouts. Workers with other settings get queues of their own."""
    return start_worker(queue="celery")


def submit(client: Celery, worker: Worker, **kwargs: Any) -> AsyncResult:
    """Submit by name, as another service would, to the given worker's queue."""
    return client.send_task(TASK, kwargs=kwargs, queue=worker.queue)


def run(client: Celery, worker: Worker, timeout: float = 30, **kwargs: Any) -> dict[str, Any]:
    """Submit and wait for the result; raise the task's error if it failed."""
    result: dict[str, Any] = submit(client, worker, **kwargs).get(timeout=timeout)
    return result


def failure(client: Celery, worker: Worker, timeout: float = 30, **kwargs: Any) -> tuple[str, str]:
    """Submit something that must fail; return (state, error message)."""
    res = submit(client, worker, **kwargs)
    with pytest.raises(Exception) as info:
        res.get(timeout=timeout)
    return res.state, str(info.value)


@pytest.fixture
def dest() -> str:
    return f"t/{uuid.uuid4().hex}.bin"


@pytest.fixture
def key() -> str:
    """A fresh counter key for the origin's flaky/cut/stall modes."""
    return uuid.uuid4().hex


def partials(download_dir: Path) -> list[Path]:
    return sorted((Path(download_dir) / ".partial").glob("*.part"))


def partial_of(download_dir: Path, dest: str, url: str) -> Path:
    """Where the in-progress bytes of (url, dest) live."""
    from tasks.core.storage import Target

    return Target(Path(download_dir), dest, url).part_path


def active_pid(client: Celery, worker: Worker, task_id: str, timeout: float = 30) -> int:
    """The pid of the child running `task_id` (from `inspect active`)."""

    def find() -> int | None:
        replies = client.control.inspect([worker.hostname], timeout=0.5).active() or {}
        for task in replies.get(worker.hostname, []):
            if task["id"] == task_id and task.get("worker_pid"):
                return int(task["worker_pid"])
        return None

    return int(wait_for(find, timeout, f"task {task_id} to be active"))


def kill_each_delivery(
    client: Celery, worker: Worker, origin: OriginServer, key: str, task_id: str, times: int
) -> None:
    """SIGKILL the child running `task_id` at each of its next `times` deliveries (each one
    seen at the origin as a request with ?key=`key`), and wait for each child to be gone."""
    import os

    killed: set[int] = set()
    for _ in range(times):
        wait_for(lambda: len(origin.stats.for_key(key)) > len(killed), 30, "a new delivery")
        pid = active_pid(client, worker, task_id)
        os.kill(pid, signal.SIGKILL)
        killed.add(pid)
        wait_for(lambda p=pid: p not in worker.children(), 30, "the child to be gone")


@pytest.fixture(scope="session")
def flower(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `celery -A worker flower` on a free 127.0.0.1 port with basic auth, receiving
    events before any test that asks for it submits (tests/flower_process.py)."""
    from tests.flower_process import Flower

    env = worker_env(redis_server.url, tmp_path_factory.mktemp("flower-downloads"))
    proc = Flower(env, tmp_path_factory.mktemp("flower") / "flower.log").start()
    yield proc
    proc.stop()
