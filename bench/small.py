"""Many 16 KiB files, files/s for this worker (2 children) against curl, wget, aria2c
and a no-op task on the same worker, broker and configuration (Celery's own ceiling)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from bench.config import Config
from bench.stack import (
    Nginx,
    Stack,
    available,
    children_cpu_seconds,
    cpu_seconds,
    last_done,
    rotated,
    run_measured,
    send_all,
    wait_all,
)
from bench.stats import ratios, summary
from download_client.contract import TASK_NAME
from tests.harness import Worker

Client = Callable[[Path, int], float]  # (new output directory, run number) -> seconds
AS_LONG = "no-op task, as long as a download"
CALIBRATION = 200  # downloads whose median time in the child the long no-op sleeps


def held_for(stack: Stack, w: Worker, urls: list[str]) -> float:
    """The median seconds a 16 KiB download holds its child (its result's `elapsed_s`), from
    downloads made before the timed runs (not timed themselves)."""
    kwargs = ({"url": u, "dest": f"p3/hold/{i}.bin"} for i, u in enumerate(urls))
    results = send_all(stack.client, TASK_NAME, w.queue, kwargs)
    wait_all(results, timeout=600)
    return float(median(r.result["elapsed_s"] for r in results))


def run(stack: Stack, cfg: Config, nginx: Nginx) -> dict[str, Any]:
    n = cfg.small_files
    names = [f"f{i:04d}.bin" for i in range(n)]
    urls = [f"{nginx.url}/small/{name}" for name in names]
    lists = stack.work / "small-lists"
    lists.mkdir(exist_ok=True)
    (lists / "urls.txt").write_text("".join(u + "\n" for u in urls))
    # Workers with production settings (recycling after 1,000 tasks included); the no-op runs on
    # the same worker, so configuration, broker and concurrency are the same by construction.
    w = stack.worker("small", include=["bench.tasks"])
    hold = held_for(stack, w, urls[:CALIBRATION])
    clients: dict[str, Client] = {
        "worker": lambda out, r: _celery(stack, w, TASK_NAME, urls, f"p3/{r}", n),
        "no-op task": lambda out, r: _celery(stack, w, "bench.noop", urls, f"p3/noop-{r}", n),
        AS_LONG: lambda out, r: _celery(
            stack, w, "bench.noop_as_long", urls, f"p3/long-{r}", n, hold_s=hold
        ),
    }
    peers: dict[str, tuple[str, Client]] = {
        "curl (one invocation)": ("curl", lambda out, r: _curl(out, urls, names)),
        "wget -i": (
            "wget",
            lambda out, r: _run(["wget", "-q", "-i", str(lists / "urls.txt")], out),
        ),
        "aria2c -j2": ("aria2c", lambda out, r: _aria2(out, lists / "urls.txt", 2)),
        "aria2c -j16": ("aria2c", lambda out, r: _aria2(out, lists / "urls.txt", 16)),
    }
    found, missing = available(peers)
    clients.update(found)
    rates: dict[str, list[float]] = {name: [] for name in clients}
    conns: dict[str, list[int]] = {name: [] for name in clients}
    # CPU a task in the worker's children, its main process and Redis, for both Celery clients.
    assert w.proc is not None and stack.redis.proc is not None
    main, redis = w.proc.pid, stack.redis.proc.pid
    parts: dict[str, Callable[[], float]] = {
        "child": lambda: children_cpu_seconds(main),
        "child, of it in the kernel": lambda: children_cpu_seconds(main, kernel_only=True),
        "main": lambda: cpu_seconds([main]),  # its own threads, not its children
        "redis": lambda: cpu_seconds([redis]),
    }
    cpu: dict[str, dict[str, list[float]]] = {
        name: {part: [] for part in parts} for name in ("worker", "no-op task", AS_LONG)
    }
    order = list(clients)
    try:
        for r in range(cfg.small_runs):
            for name in rotated(order, r):
                out = stack.work / "p3" / f"{r}-{order.index(name)}"
                out.mkdir(parents=True)  # a new directory each run (ext4 after deletes is slow)
                os.sync()  # not timed: no run starts with the previous run's dirty pages
                before = nginx.accepts()
                used = {part: read() for part, read in parts.items()}
                seconds = clients[name](out, r)
                if name in cpu:
                    for part, read in parts.items():
                        ms = (read() - used[part]) * 1000 / n
                        cpu[name][part].append(ms)
                conns[name].append(nginx.accepts() - before - 1)
                rates[name].append(n / seconds)
    finally:
        stack.stop_worker(w)
    return {
        "files": n,
        "runs": cfg.small_runs,
        "missing": missing,
        "files_per_s": {k: summary(v) for k, v in rates.items()},
        "connections": {k: summary([float(c) for c in v]) for k, v in conns.items()},
        "worker_vs_noop": ratios(rates["worker"], rates["no-op task"]),
        "cpu_ms_per_task": {
            name: {part: summary(v) for part, v in by.items()} for name, by in cpu.items()
        },
        "cpu_vs_noop": {
            part: ratios(cpu["worker"][part], cpu["no-op task"][part]) for part in parts
        },
        "hold_s": hold,
        "cpu_vs_noop_as_long": {
            part: ratios(cpu["worker"][part], cpu[AS_LONG][part]) for part in parts
        },
        "worker_vs": {k: ratios(rates["worker"], v) for k, v in rates.items() if k != "worker"},
        "raw": rates,
    }


def _celery(
    stack: Stack, w: Worker, task: str, urls: list[str], prefix: str, n: int, **extra: Any
) -> float:
    """Submit `n` tasks in a loop as a producer would; seconds from the first send until the
    worker stored the last result."""
    kwargs = ({"url": u, "dest": f"{prefix}/{i}.bin", **extra} for i, u in enumerate(urls[:n]))
    started = time.time()
    results = send_all(stack.client, task, w.queue, kwargs)
    wait_all(results, timeout=600)
    return last_done(results) - started


def _run(cmd: list[str], out: Path) -> float:
    seconds, _ = run_measured(cmd, timeout=600, cwd=out)
    return seconds


def _curl(out: Path, urls: list[str], names: list[str], *flags: str) -> float:
    config = out.parent / f"{out.name}.curlrc"
    config.write_text(
        "".join(f'url = "{u}"\noutput = "{n}"\n' for u, n in zip(urls, names, strict=True))
    )
    return _run(["curl", "-sS", "--fail", *flags, "-K", str(config)], out)


def _aria2(out: Path, urls: Path, jobs: int) -> float:
    return _run(
        [
            *("aria2c", "-q", f"-j{jobs}", "-i", str(urls), "-d", str(out)),
            *("--allow-overwrite=true", "--auto-file-renaming=false", "--summary-interval=0"),
        ],
        out,
    )
