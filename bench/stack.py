"""The parts a benchmark runs against, all on 127.0.0.1: a private Redis and real
`celery -A worker worker` processes (the test suite's own helpers), nginx as a fast origin with a
generated configuration, and the measuring tools (RSS, peak RSS, TIME_WAIT sockets, timed peers)."""

from __future__ import annotations

import contextlib
import http.client
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar

import psutil
from celery import Celery
from celery.result import AsyncResult

from download_client.client import connect
from download_client.settings import Settings
from tests.harness import RedisServer, Worker, free_port, wait_for, worker_env

T = TypeVar("T")
# The worker's production defaults where the test environment changes them: the per-origin
# bookkeeping (slots at each origin) is on, as it is in production.
BENCH_SETTINGS = {
    "DOWNLOAD_CONNECT_TIMEOUT": "10",
    "DOWNLOAD_READ_TIMEOUT": "30",
    "DOWNLOAD_PROGRESS_INTERVAL": "0.5",
    "DOWNLOAD_RETRY_BACKOFF": "2",
    "DOWNLOAD_RETRY_BACKOFF_MAX": "600",
    "DOWNLOAD_MAX_RETRIES": "5",
    "DOWNLOAD_HOST_CONCURRENCY": "8",
}
SMALL_BYTES = 16 * 1024
NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    default_type application/octet-stream;
    # nginx closes a keep-alive connection after 1,000 requests by default; a downloader's
    # connection count should not be the origin's choice here.
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = /nginx-status {{ stub_status; }}
        {extra}
    }}
}}
"""


class Nginx:
    """nginx as one foreground process of ours, serving `root` on a free loopback port."""

    def __init__(self, work: Path, root: Path, extra: str = "") -> None:
        """`extra`: more of the server block (`{root}` in it is the served directory)."""
        work.mkdir(parents=True, exist_ok=True)
        self.work, self.root, self.port = work, root, free_port()
        self.extra = extra.replace("{root}", str(root))
        self.proc: subprocess.Popen[bytes] | None = None
        self.status_calls = 0  # our own connections, each closed by nginx (TIME_WAIT there)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Nginx:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        conf = self.work / "nginx.conf"
        conf.write_text(NGINX_CONF.format(work=self.work, port=self.port, root=self.root,
                                          extra=self.extra))  # fmt: skip
        self.proc = subprocess.Popen(
            [binary, "-p", str(self.work), "-c", str(conf), "-e", str(self.work / "nginx.err")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 10, "nginx to answer")
        return self

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.work / 'nginx.err').read_text()}")
        try:
            self.accepts()
        except OSError:
            return False
        return True

    def accepts(self) -> int:
        """TCP connections nginx has accepted so far (stub_status; its own request included)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            conn.request("GET", "/nginx-status", headers={"Connection": "close"})
            text = conn.getresponse().read().decode()
        finally:
            conn.close()
        self.status_calls += 1  # only answered ones: a refused probe leaves no socket behind
        return int(text.splitlines()[2].split()[0])

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None


def make_files(root: Path, small: int, large: int) -> None:
    """The origin's files: small/f0000.bin... (16 KiB each) and, if `large`, big.bin."""
    (root / "small").mkdir(parents=True, exist_ok=True)
    for i in range(small):
        path = root / "small" / f"f{i:04d}.bin"
        if not path.exists():
            path.write_bytes(os.urandom(SMALL_BYTES))
    big = root / "big.bin"
    if large and not (big.exists() and big.stat().st_size == large):
        block = os.urandom(2**20)
        with big.open("wb") as f:
            for _ in range(large // len(block)):
                f.write(block)
            f.write(block[: large % len(block)])


class Stack:
    """A private Redis, a producer app on it, and the workers started against it."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.redis = RedisServer(work)
        self.workers: list[Worker] = []
        self.app: Celery | None = None

    def __enter__(self) -> Stack:
        self.redis.start()
        self.app = connect(Settings.from_env(worker_env(self.redis.url, self.work)))
        return self

    def __exit__(self, *_: object) -> None:
        for w in self.workers:
            w.stop()
        self.redis.stop()

    @property
    def client(self) -> Celery:
        assert self.app is not None
        return self.app

    def worker(
        self, name: str, include: Sequence[str] = (), queue: str = "", **overrides: str
    ) -> Worker:
        """A worker on its own queue (or `queue`, shared with others) and its own download
        directory: 2 prefork children unless WORKER_CONCURRENCY is among the overrides."""
        ddir = self.work / f"downloads-{name}"
        settings = {"WORKER_CONCURRENCY": "2", **BENCH_SETTINGS, **overrides}
        env = worker_env(self.redis.url, ddir, **settings)
        extra = [f"--include={','.join(include)}"] if include else []
        queue = queue or f"{name}-{uuid.uuid4().hex[:6]}"
        w = Worker(env, name, queue, self.work / f"{name}.log", ddir, extra)
        self.workers.append(w)
        return w.start(self.client)

    def stop_worker(self, w: Worker) -> None:
        w.stop()
        self.workers.remove(w)


def send_all(app: Celery, task: str, queue: str, kwargs: Iterable[dict[str, Any]]) -> list[Any]:
    return [app.send_task(task, kwargs=kw, queue=queue) for kw in kwargs]


def wait_all(results: Sequence[AsyncResult], timeout: float) -> None:
    """Wait until every result is in; raise the first failure (a benchmark must not fail)."""
    deadline = time.monotonic() + timeout
    for r in reversed(results):  # FIFO queue: the last one sent is about the last one done
        r.get(timeout=max(0.1, deadline - time.monotonic()), propagate=True)


def last_done(results: Sequence[AsyncResult]) -> float:
    """The Unix time at which the last of `results` was stored, as the worker recorded it."""
    stamps = []
    for r in results:
        done = r.date_done
        if done.tzinfo is None:
            done = done.replace(tzinfo=UTC)
        stamps.append(float(done.timestamp()))
    return max(stamps)


# -- peers and rounds ------------------------------------------------------------------------
def available(peers: Mapping[str, tuple[str, T]]) -> tuple[dict[str, T], list[str]]:
    """The peers whose program (the first of each pair) is installed, and the names of the rest."""
    found = {name: client for name, (binary, client) in peers.items() if shutil.which(binary)}
    return found, [name for name in peers if name not in found]


def rotated(names: Sequence[str], run: int) -> list[str]:
    """Round `run`'s order: each client goes first in turn, so no one always runs warm or cold."""
    k = run % len(names)
    return [*names[k:], *names[:k]]


# -- memory ---------------------------------------------------------------------------------
def status_kib(pid: int, key: str) -> int:
    """A `kB` field of /proc/<pid>/status (VmRSS, VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where not permitted."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mib(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss) / 2**20


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total


def children_cpu_seconds(main: int, kernel_only: bool = False) -> float:
    """CPU of all of `main`'s children, live and reaped: a child recycled between two readings
    moves from the one to the other, so a difference of two readings counts it whole.
    `kernel_only`: their system time alone (file system, sockets, pipes)."""
    proc = psutil.Process(main)
    t = proc.cpu_times()
    total = float(t.children_system + (0 if kernel_only else t.children_user))
    for child in proc.children():
        with contextlib.suppress(psutil.NoSuchProcess):
            c = child.cpu_times()
            total += c.system + (0 if kernel_only else c.user)
    return total


def time_wait(port: int) -> int:
    """TCP sockets in TIME_WAIT on either side of a connection to `port`."""
    return sum(
        1
        for c in psutil.net_connections("tcp")
        if c.status == psutil.CONN_TIME_WAIT
        and ((c.laddr and c.laddr.port == port) or (c.raddr and c.raddr.port == port))
    )


def run_measured(cmd: Sequence[str], timeout: float, cwd: Path | None = None) -> tuple[float, int]:
    """Run a peer; return (wall seconds, peak RSS in KiB read from VmHWM while it ran)."""
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True
        )
        peak = 0
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            with contextlib.suppress(OSError, KeyError):  # /proc between fork, exec and exit
                peak = max(peak, status_kib(proc.pid, "VmHWM"))
            if time.monotonic() > deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise TimeoutError(f"{cmd[0]} took more than {timeout}s")
            time.sleep(0.005)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            errors.seek(0)
            err = errors.read().decode(errors="replace")
            raise RuntimeError(f"{' '.join(cmd[:3])}... exited {proc.returncode}: {err[-500:]}")
    return elapsed, peak
