"""The seed's workload: a batch of images from one origin that answers after a delay, submitted
through the Python client with its defaults (the worker's per-origin cap, 8), timed from the
first send to the last result, against `curl --parallel --parallel-max 8` on the same origin."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from bench.config import KIB, Config
from bench.delayed import DelayedOrigin
from bench.small import _curl
from bench.stack import Stack, last_done, rotated, wait_all
from bench.stats import fmt, ratios, summary
from download_client.client import submit_many

TTFB_MS = 50
IMAGE_BYTES = 200 * KIB
CAP = 8  # the worker's default DOWNLOAD_HOST_CONCURRENCY


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    n, rounds = (200, 1) if cfg.quick else (1000, 5)
    origin = DelayedOrigin()  # its own process
    w = stack.worker("seed", WORKER_CONCURRENCY=str(CAP), DOWNLOAD_HOST_CONCURRENCY=str(CAP))
    names = [f"img{i:04d}.jpg" for i in range(n)]
    base = origin.url(TTFB_MS, IMAGE_BYTES)
    urls = [f"{base}/{name}" for name in names]
    work = stack.work / "seed"
    work.mkdir()
    rates: dict[str, list[float]] = {"worker": [], "curl --parallel": []}
    try:
        # Not timed: every child opens its connection and imports what it imports lazily first.
        warm = [
            {"url": f"{origin.url(0, IMAGE_BYTES)}/w{i}", "dest": f"warm/{i}"} for i in range(CAP)
        ]
        wait_all(submit_many(stack.client, warm, queue=w.queue), timeout=120)
        for r in range(rounds):
            for name in rotated(list(rates), r):
                out = work / f"{r}-{name.split()[0]}"
                out.mkdir()
                if name == "worker":
                    items = [{"url": u, "dest": f"seed/{r}/{i}.jpg"} for i, u in enumerate(urls)]
                    started = time.time()
                    results = submit_many(stack.client, items, queue=w.queue)
                    wait_all(results, timeout=900)
                    seconds = last_done(results) - started
                else:
                    seconds = _curl(out, urls, names, "-Z", "--parallel-max", str(CAP))
                rates[name].append(n / seconds)
    finally:
        stack.stop_worker(w)
        origin.stop()
    return {
        "images": n,
        "bytes": IMAGE_BYTES,
        "ttfb_ms": TTFB_MS,
        "cap": CAP,
        "rounds": rounds,
        "files_per_s": {k: summary(v) for k, v in rates.items()},
        "worker_vs_curl": ratios(rates["worker"], rates["curl --parallel"]),
    }


def render(seed: Mapping[str, Any]) -> str:
    rates = seed["files_per_s"]
    return (
        "## 7. The seed's batch\n\n"
        f"{seed['images']:,} images of {seed['bytes'] // KIB} KiB from one origin answering after "
        f"{seed['ttfb_ms']} ms (in a process of its own), submitted with the Python client's "
        f"`submit_many` and its defaults to a worker of {seed['cap']} slots with the default "
        f"per-origin cap ({seed['cap']}); from the first send to the last result's `date_done`. "
        f"Medians (min-max) of {seed['rounds']} rounds, each ratio against curl in the same "
        "round.\n\n"
        "| client | images/s | worker / curl |\n|---|---|---|\n"
        f"| worker | {fmt(rates['worker'], 1)} | {fmt(seed['worker_vs_curl'], 2)} |\n"
        f"| curl --parallel --parallel-max {seed['cap']} | {fmt(rates['curl --parallel'], 1)} "
        "| |\n"
    )
