"""`make demo`, offline: 50 generated images served on loopback go through
the real stack (Redis, a real worker with 2 children), with progress and a summary: files, bytes,
time, the children's RSS before and after, and the TCP connections the origin saw."""

from __future__ import annotations

import os
import random
import shutil
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path

import psutil
import redis
from celery.result import AsyncResult

from download_client.client import BatchProgress, connect, submit, wait
from download_client.settings import Settings
from tests.harness import RedisServer, Worker, worker_env
from tests.server import OriginServer

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


def private_redis(tmp: Path) -> tuple[str, RedisServer | None]:
    """The configured Redis if it answers, else a private redis-server on a free port."""
    url = os.environ.get("CELERY_BROKER_URL", "redis://localhost:6379/0").rsplit("/", 1)[0]
    try:
        redis.Redis.from_url(url, socket_timeout=1).ping()
        return url, None
    except redis.RedisError:
        pass
    if shutil.which("redis-server") is None:
        sys.exit(
            "demo: no Redis answers at CELERY_BROKER_URL and redis-server is not installed "
            "(apt-get install redis-server), or start one with `make run` first"
        )
    server = RedisServer(tmp)
    server.start()
    return server.url, server


def rss_mib(pids: list[int]) -> list[float]:
    return [
        round(psutil.Process(p).memory_info().rss / 2**20, 1) for p in pids if psutil.pid_exists(p)
    ]


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="demo-"))
    (tmp / "site").mkdir()
    names = gallery(tmp / "site")
    origin = OriginServer(files_dir=tmp / "site").start()
    url, own_redis = private_redis(tmp)
    out_dir = ROOT / "downloads" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    # Its own worker and queue: the origin is on loopback, which `make run`'s worker refuses.
    env = worker_env(url, out_dir, DOWNLOAD_PROGRESS_INTERVAL="0.2")
    # Its worker is named demo-<pid>@host and consumes its own queue. Against `make run`'s Redis
    # it is meant to be seen: Flower lists it and the 50 downloads while the demo runs. Once it
    # stops, `make run`'s Flower drops it from the worker list after FLOWER_PURGE_OFFLINE_WORKERS
    # seconds (scripts/stack.sh), instead of showing a dead worker for as long as Flower runs.
    name = f"demo-{os.getpid()}"
    os.environ.update(CELERY_BROKER_URL=f"{url}/0", CELERY_RESULT_BACKEND=f"{url}/1")
    app = connect(Settings.from_env())
    worker = Worker(env, name, name, tmp / "worker.log", out_dir, ["-c", "2"])
    try:
        worker.start(app)
        children = worker.children()
        before = rss_mib(children)
        print(f"stack: redis {url}, worker children {children}, origin {origin.url}")
        if own_redis is None:
            print(f"watch it in Flower (`make run`): worker {worker.hostname}, queue {name}")
        print(f"submitting {IMAGES} images...")
        started = time.monotonic()
        results = [
            submit(app, f"{origin.url}/files/{n}", dest=f"gallery/{n}", queue=name) for n in names
        ]
        batch = BatchProgress(results)
        shown = [""]

        def show(result: AsyncResult, state: str, info: object) -> None:
            batch.update(result, state, info)
            s = batch.summary()
            line = f"{s['succeeded']}/{IMAGES} done, {s['running']} running, {s['bytes']} bytes"
            if line != shown[0] and (sys.stdout.isatty() or s["succeeded"] % 10 == 0):
                print(f"\r  {line}", end="" if sys.stdout.isatty() else "\n", flush=True)
                shown[0] = line

        finished = wait(results, timeout=120, on_update=show)
        elapsed = time.monotonic() - started
        print()
        ok = [r.result for r in finished.values() if r.state == "SUCCESS"]
        total = sum(r["size"] for r in ok)
        print(f"files:        {len(ok)} of {IMAGES} succeeded, in {out_dir}/gallery")
        print(f"bytes:        {total} ({total / 2**20:.1f} MiB)")
        print(f"time:         {elapsed:.2f} s ({len(ok) / elapsed:.0f} files/s)")
        print(f"children RSS: before {before} MiB, after {rss_mib(children)} MiB")
        print(f"TCP connections at the origin: {origin.stats.connections} for {IMAGES} downloads")
        if len(ok) != IMAGES:
            sys.exit(1)
    finally:
        worker.stop()
        origin.stop()
        if own_redis is not None:
            own_redis.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
