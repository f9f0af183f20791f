"""`make demo`: the seed's scenario offline. 50 generated images served on loopback go through
the real stack (Redis, a real worker with 2 children), with progress and a summary: files, bytes,
time, the children's RSS before and after, and the TCP connections the origin saw."""

from __future__ import annotations

import os
import random
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import redis

from tasks.client import connect, submit, wait
from tests.server import OriginServer
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
IMAGES = 50


def png(width: int, height: int, rng: random.Random) -> bytes:
    """A valid RGB PNG of noise (incompressible, so sizes are like real photos)."""
    raw = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 1))
        + chunk(b"IEND", b"")
    )


def gallery(folder: Path) -> list[str]:
    rng = random.Random(42)
    names = []
    for i in range(IMAGES):
        name = f"photo-{i:02d}.png"
        (folder / name).write_bytes(png(rng.randint(120, 260), rng.randint(120, 260), rng))
        names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_url(tmp: Path) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The configured Redis if it answers, else a private redis-server on a free port."""
    url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0").rsplit("/", 1)[0]
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
        return url, None
    except redis.RedisError:
        pass
    if shutil.which("redis-server") is None:
        sys.exit(
            "demo: no Redis answers and redis-server is not installed (apt-get install "
            "redis-server), or start one with `make run` first"
        )
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(tmp),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}"
    for _ in range(100):
        try:
            redis.Redis.from_url(url).ping()
            return url, proc
        except redis.RedisError:
            time.sleep(0.05)
    sys.exit("demo: redis-server did not start")


def rss_mib(pids: list[int]) -> list[float]:
    return [round(psutil.Process(p).memory_info().rss / 2**20, 1) for p in pids]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="demo-"))
    (tmp / "site").mkdir()
    names = gallery(tmp / "site")
    origin = OriginServer(files_dir=tmp / "site").start()
    url, redis_proc = redis_url(tmp)
    queue = f"demo-{os.getpid()}"
    out_dir = ROOT / "downloads" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    env = {
        **os.environ,
        "CELERY_BROKER_URL": f"{url}/0",
        "CELERY_RESULT_BACKEND": f"{url}/1",
        "DOWNLOAD_DIR": str(out_dir),
        "DOWNLOAD_ALLOW_PRIVATE": "true",
        "DOWNLOAD_PROGRESS_INTERVAL": "0.2",
        "PYTHONPATH": str(ROOT),
    }
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker",
            "worker",
            "-Q",
            queue,
            "-c",
            "2",
            "--hostname",
            f"demo-{os.getpid()}@%h",
            "-l",
            "warning",
            "--without-mingle",
            "--without-gossip",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    os.environ.update(CELERY_BROKER_URL=f"{url}/0", CELERY_RESULT_BACKEND=f"{url}/1")
    app = connect(Settings.from_env())
    try:
        for _ in range(300):
            if app.control.ping(
                destination=[f"demo-{os.getpid()}@{socket.gethostname()}"], timeout=0.2
            ):
                break
        children = [c.pid for c in psutil.Process(worker.pid).children()]
        before = rss_mib(children)
        print(
            f"stack: redis {url}, worker pid {worker.pid} children {children}, origin "
            f"{origin.url}\nsubmitting {IMAGES} images..."
        )
        started = time.monotonic()
        results = [
            submit(app, f"{origin.url}/files/{n}", dest=f"gallery/{n}", queue=queue) for n in names
        ]
        states: dict[str, str] = {}
        shown = [-1]

        def show(result: object, state: str, info: object) -> None:
            states[result.id] = state  # type: ignore[attr-defined]
            done = sum(1 for s in states.values() if s == "SUCCESS")
            if done != shown[0] and (done % 10 == 0 or sys.stdout.isatty()):
                print(
                    f"\r  {done}/{IMAGES} done", end="" if sys.stdout.isatty() else "\n", flush=True
                )
                shown[0] = done

        finished = wait(results, timeout=120, on_update=show)
        elapsed = time.monotonic() - started
        print()
        ok = [r.result for r in finished.values() if r.state == "SUCCESS"]
        total = sum(r["size"] for r in ok)
        after = rss_mib([p for p in children if psutil.pid_exists(p)])
        print(f"files:        {len(ok)} of {IMAGES} succeeded, in {out_dir}/gallery")
        print(f"bytes:        {total} ({total / 2**20:.1f} MiB)")
        print(f"time:         {elapsed:.2f} s ({len(ok) / elapsed:.0f} files/s)")
        print(f"children RSS: before {before} MiB, after {after} MiB")
        print(f"TCP connections at the origin: {origin.stats.connections} for {IMAGES} downloads")
        if len(ok) != IMAGES:
            sys.exit(1)
    finally:
        worker.terminate()
        worker.wait(30)
        origin.stop()
        if redis_proc is not None:
            redis_proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
