"""Real parts to run the service against, shared by the tests, the benchmark and the demo: a
private redis-server on a free port (stoppable, crashable), real `celery -A worker worker`
processes with their own environment, and polling helpers. Only 127.0.0.1 is ever used."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from kombu.exceptions import OperationalError

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

    def __init__(
        self, workdir: Path, persistent: bool = False, also_bind: tuple[str, ...] = ()
    ) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.also_bind = also_bind  # addresses of network namespaces a test made, besides loopback
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
            raise RuntimeError(
                "redis-server is not installed (Debian: apt-get install redis-server)"
            )
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                *self.also_bind,
                # Clients from a test's own namespaces are not loopback: let them in (no password).
                "--protected-mode",
                "no" if self.also_bind else "yes",
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
    """A real `celery -A worker worker` process with its own environment. Its pool size comes
    from `extra` (`-c N`) or, without one, from WORKER_CONCURRENCY."""

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
            "--without-mingle",
            "--without-gossip",
            *extra,
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.hostname = f"{name}@{socket.gethostname()}"

    def start(self, client: Celery, ready_within: float = 60) -> Worker:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(lambda: self._ready(client), ready_within, f"worker {self.name} to answer ping")
        return self

    def _ready(self, client: Celery) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"worker exited early:\n{self.log()}")
        try:
            return bool(client.control.ping(destination=[self.hostname], timeout=0.5))
        except (redis.ConnectionError, OSError, OperationalError):  # the broker restarting
            return False

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
        # Many tests share one loopback origin at once; the per-origin limit has tests of its own.
        DOWNLOAD_HOST_CONCURRENCY="0",
        PYTHONPATH=str(ROOT),
    )
    env.update(overrides)
    return env


def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m download_client.cli ARGS` as another process, its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "download_client.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
