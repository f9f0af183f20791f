"""One large body (1 GiB): throughput and peak RSS of the worker child that downloads it,
for several DOWNLOAD_CHUNK_SIZE values, against curl, wget, aria2c and a plain disk copy, all in
the same rounds; the worker is timed from submission to SUCCESS, what a producer waits for. Every
run writes into a new directory; outputs are removed after each round."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.config import KIB, MIB, Config
from bench.stack import Nginx, Stack, available, reset_peak, rotated, run_measured, status_kib
from bench.stats import ratios, summary
from download_client.contract import TASK_NAME
from download_client.settings import Settings
from tests.harness import Worker

# output directory -> (seconds, peak RSS MiB, growth over idle RSS MiB: worker children only)
Client = Callable[[Path], tuple[float, float, float | None]]
DEFAULT_CHUNK = Settings.from_env({}).chunk_size


def chunk_label(size: int) -> str:
    return f"{size // MIB} MiB" if size >= MIB else f"{size // KIB} KiB"


def run(stack: Stack, cfg: Config, nginx: Nginx, files: Path) -> dict[str, Any]:
    url = f"{nginx.url}/big.bin"
    src = files / "big.bin"
    size = src.stat().st_size
    _run(["curl", "-sS", "-o", "/dev/null", url], Path("/"))  # warm: the source in the page cache
    clients: dict[str, Client] = {}
    workers = []
    for chunk in sorted(set(cfg.chunk_sizes) | {DEFAULT_CHUNK}):
        w = stack.worker(f"large-{chunk // KIB}k", DOWNLOAD_CHUNK_SIZE=str(chunk))
        workers.append(w)
        label = "worker" if chunk == DEFAULT_CHUNK else f"worker, {chunk_label(chunk)} chunks"
        clients[label] = _worker_client(stack, w, url, size)
    peers: dict[str, tuple[str, Client]] = {
        "curl": ("curl", lambda out: _run(["curl", "-sS", "-o", "big.bin", url], out)),
        "curl + fsync": (
            "curl",
            lambda out: _then_fsync(["curl", "-sS", "-o", "big.bin", url], out),
        ),
        "wget": ("wget", lambda out: _run(["wget", "-q", "-O", "big.bin", url], out)),
        "aria2c -x1": ("aria2c", lambda out: _run(_aria2(url), out)),
        "dd (disk copy)": ("dd", lambda out: _run(["dd", f"if={src}", "of=big.bin", "bs=1M"], out)),
        # The durable limit: the same bytes, from the page cache, written and fsynced.
        "dd + fsync": (
            "dd",
            lambda out: _run(["dd", f"if={src}", "of=big.bin", "bs=1M", "conv=fsync"], out),
        ),
    }
    found, missing = available(peers)
    clients.update(found)
    speed: dict[str, list[float]] = {name: [] for name in clients}
    peak: dict[str, list[float]] = {name: [] for name in clients}
    growth: dict[str, list[float]] = {name: [] for name in clients}
    order = list(clients)
    try:
        for r in range(cfg.large_runs):
            round_dir = stack.work / "p2" / f"round-{r}"
            for i, name in enumerate(rotated(order, r)):
                out = round_dir / f"{i}"
                out.mkdir(parents=True)
                os.sync()  # no dirty pages left by the run before: each starts from the same state
                seconds, rss, grew = clients[name](out)
                speed[name].append(size / 1e6 / seconds)
                peak[name].append(rss)
                if grew is not None:
                    growth[name].append(grew)
            shutil.rmtree(round_dir)  # a few large files, not a mass delete; keeps the disk free
    finally:
        for w in workers:
            stack.stop_worker(w)
    return {
        "bytes": size,
        "runs": cfg.large_runs,
        "memory": "warm: rounds back to back, the source file in the page cache, and a sync "
        "(not timed) before each run so none starts with another's dirty pages to write",
        "missing": missing,
        "mb_per_s": {k: summary(v) for k, v in speed.items()},
        "peak_rss_mib": {k: summary(v) for k, v in peak.items()},
        "rss_growth_mib": {k: summary(v) for k, v in growth.items() if v},
        "worker_vs": {k: ratios(speed["worker"], v) for k, v in speed.items() if k != "worker"},
        "raw": speed,
    }


def _worker_client(stack: Stack, w: Worker, url: str, size: int) -> Client:
    def client(out: Path) -> tuple[float, float, float | None]:
        rel = out.relative_to(stack.work)
        children = w.children()
        idle = {pid: status_kib(pid, "VmRSS") for pid in children}
        if not all(reset_peak(pid) for pid in children):
            raise RuntimeError("cannot reset peak RSS (/proc/<pid>/clear_refs): run as root")
        started = time.perf_counter()
        result = stack.client.send_task(
            TASK_NAME, kwargs={"url": url, "dest": f"{rel}/big.bin"}, queue=w.queue
        ).get(timeout=600)
        seconds = time.perf_counter() - started
        if result["size"] != size:
            raise RuntimeError(f"the worker stored {result['size']} bytes, not {size}")
        # The child that did the work is the one whose peak moved most over its idle RSS.
        pid = max(children, key=lambda p: status_kib(p, "VmHWM") - idle[p])
        hwm = status_kib(pid, "VmHWM")
        return seconds, hwm / 1024, (hwm - idle[pid]) / 1024

    return client


def _run(cmd: list[str], out: Path) -> tuple[float, float, float | None]:
    seconds, peak_kib = run_measured(cmd, timeout=600, cwd=out)
    return seconds, peak_kib / 1024, None


def _then_fsync(cmd: list[str], out: Path) -> tuple[float, float, float | None]:
    """The peer, then an fsync of its file: the durability the worker pays for before rename."""
    started = time.perf_counter()
    _, peak, _ = _run(cmd, out)
    fd = os.open(out / "big.bin", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started, peak, None


def _aria2(url: str) -> list[str]:
    return ["aria2c", "-q", "-x1", "-o", "big.bin", "--allow-overwrite=true", url]
