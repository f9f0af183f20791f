"""Real parts for the tests: a private redis-server on a free port, the loopback origin, and real
`celery -A worker worker` processes. Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from tests.server import OriginServer

ROOT = Path(__file__).resolve().parent.parent
TASK = "downloads.fetch"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 30, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class RedisServer:
    """A private redis-server this test session owns; it can be stopped and started again."""

    def __init__(self, workdir: Path, persistent: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if persistent
            else ["--appendonly", "no"]
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (Debian: apt-get install redis-server)")
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                *self.persistence,
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        wait_for(lambda: _pings(client), 10, "redis-server to answer")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def kill(self) -> None:
        """A crash: SIGKILL, no chance to flush anything (the AOF is fsynced per write)."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


class Worker:
    """A real `celery -A worker worker` process with its own environment."""

    def __init__(
        self,
        env: dict[str, str],
        name: str,
        queue: str,
        log: Path,
        download_dir: Path,
        extra: list[str],
    ) -> None:
        self.env, self.name, self.queue, self.log_path = env, name, queue, log
        self.download_dir = download_dir
        self.cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "-l",
            "info",
            "--hostname",
            f"{name}@%h",
            "-Q",
            queue,
            "-c",
            "2",
            "--without-mingle",
            "--without-gossip",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.hostname = f"{name}@{socket.gethostname()}"

    def start(self, client: Celery) -> Worker:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self._ready(client), 60, f"worker {self.name} to answer ping")
        return self

    def _ready(self, client: Celery) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{self.log()}")
        return bool(client.control.ping(destination=[self.hostname], timeout=0.5))

    def children(self) -> list[int]:
        import psutil

        assert self.proc is not None
        return [c.pid for c in psutil.Process(self.proc.pid).children()]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        code = self.proc.returncode
        self.proc = None
        self._log.close()
        return code


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def origin() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


def worker_env(redis_url: str, download_dir: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DOWNLOAD_"))}
    env.update(
        CELERY_BROKER_URL=f"{redis_url}/0",
        CELERY_RESULT_BACKEND=f"{redis_url}/1",
        DOWNLOAD_DIR=str(download_dir),
        DOWNLOAD_ALLOW_PRIVATE="true",  # the origin is on loopback; SSRF tests turn this off
        DOWNLOAD_CONNECT_TIMEOUT="2",
        DOWNLOAD_READ_TIMEOUT="2",
        DOWNLOAD_RETRY_BACKOFF="0.05",
        DOWNLOAD_RETRY_BACKOFF_MAX="0.3",
        DOWNLOAD_MAX_RETRIES="3",
        DOWNLOAD_PROGRESS_INTERVAL="0.1",
        PYTHONPATH=str(ROOT),
    )
    env.update(overrides)
    return env


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
        concurrency: int = 2,
        **overrides: str,
    ) -> Worker:
        name = f"w{len(started)}-{uuid.uuid4().hex[:6]}"
        ddir = download_dir or tmp_path_factory.mktemp(f"downloads-{name}")
        env = worker_env(redis_server.url, ddir, **overrides)
        logs = tmp_path_factory.mktemp("logs")
        extra = [*(extra or []), "-c", str(concurrency)]
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
    from tasks.storage import Target

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


@pytest.fixture(scope="session")
def flower(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real `celery -A worker flower` on a free 127.0.0.1 port with basic auth, receiving
    events before any test that asks for it submits (tests/flower_process.py)."""
    from tests.flower_process import Flower

    env = worker_env(redis_server.url, tmp_path_factory.mktemp("flower-downloads"))
    proc = Flower(env, tmp_path_factory.mktemp("flower") / "flower.log").start()
    yield proc
    proc.stop()
