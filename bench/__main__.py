"""`python -m bench` (or `make bench`): measure everything and write docs/benchmarks.md.
`python -m bench report` redraws the report from docs/benchmarks.json without measuring;
`python -m bench lanes` measures part 8 (the express lane) alone into it and redraws it, and
`python -m bench groups` part 9 (fair shares between groups), `python -m bench bandwidth` part 10
(bandwidth budgets).
BENCH_QUICK=1 makes a smoke run of about two minutes; BENCH_TMP picks where files are written."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import (
    bandwidth,
    groups,
    lanes,
    large,
    latency,
    live_view,
    machine,
    memory,
    profile,
    report,
    seed,
    segments,
    small,
)
from bench.config import KIB, MIB, Config
from bench.stack import Nginx, Stack, make_files

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main(argv: list[str]) -> int:
    alone = {"lanes": lanes.run, "groups": groups.run, "bandwidth": bandwidth.run,
             "segments": segments.run}  # fmt: skip
    if argv[:1] == ["report"] or (argv[:1] and argv[0] in alone):
        results = json.loads((DOCS / "benchmarks.json").read_text())
        if argv[0] in alone:
            results[argv[0]] = _alone(alone[argv[0]], Config.from_env())
        print(f"wrote {report.write(results, DOCS)}")
        return 0
    missing = [tool for tool in ("redis-server", "nginx") if not shutil.which(tool)]
    if missing:
        print(
            f"bench: cannot run without {', '.join(missing)} (apt-get install {' '.join(missing)})"
        )
        return 2
    cfg = Config.from_env()
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=os.environ.get("BENCH_TMP")))
    try:
        results = measure(cfg, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # A smoke run's figures must not replace the committed report.
    out = Path(".run/bench-quick") if cfg.quick else DOCS
    print(f"wrote {report.write(results, out)}")
    return 0


def measure(cfg: Config, work: Path) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine.describe(), "config": cfg.__dict__}
    files = work / "files"
    _step("generating the origin's files")
    make_files(files, cfg.small_files, cfg.large_bytes)
    with Stack(work) as stack:
        _step(f"part 1: memory and connections, {cfg.many:,} downloads x 4 variants")
        results["memory"] = memory.run(stack, cfg, files)
        nginx = Nginx(work / "nginx", files).start()
        try:
            _step(f"part 2: {cfg.large_bytes / 2**30:g} GiB, {cfg.large_runs} rounds")
            results["large"] = large.run(stack, cfg, nginx, files)
            _step(f"part 3: {cfg.small_files:,} x 16 KiB, {cfg.small_runs} rounds")
            results["small"] = small.run(stack, cfg, nginx)
            _step(f"part 4: profile of {cfg.profile_downloads:,} downloads")
            url = f"{nginx.url}/small/f0000.bin"
            results["profile"] = _part4(stack, url, cfg, results["large"])
        finally:
            nginx.stop()
        _step("part 5: latency, slots x time to first byte")
        results["latency"] = latency.run(stack, cfg)
        _step("part 6: the live view's cost, submit --wait on a terminal and piped")
        results["live_view"] = live_view.run(stack, cfg)
        _step("part 7: the seed's batch, images at 50 ms time to first byte")
        results["seed"] = seed.run(stack, cfg)
        _step("part 8: the express lane's share")
        results["lanes"] = lanes.run(stack, cfg)
        _step("part 9: fair shares between groups")
        results["groups"] = groups.run(stack, cfg)
        _step("part 10: bandwidth budgets")
        results["bandwidth"] = bandwidth.run(stack, cfg)
        _step("part 11: segmented downloads")
        results["segments"] = segments.run(stack, cfg)
    results["load_at_end"] = machine.load()
    results["duration_s"] = time.monotonic() - started
    return results


def _alone(part: Callable[[Stack, Config], dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """One part measured on its own stack (the rest of the report is kept as it was)."""
    work = Path(tempfile.mkdtemp(prefix="bench-", dir=os.environ.get("BENCH_TMP")))
    try:
        with Stack(work) as stack:
            return {**part(stack, cfg), "alone": True}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _part4(stack: Stack, url: str, cfg: Config, large_figures: dict[str, Any]) -> dict[str, Any]:
    figures = profile.run(stack, url, cfg.profile_downloads)
    figures["hashing"] = {f"{c // KIB} KiB chunks": profile.hashing(c) for c in (64 * KIB, MIB)}
    worker_speed = large_figures["mb_per_s"]["worker"]["median"]
    figures["progress"] = profile.progress_cost(stack.client, worker_speed)
    hash_speed = figures["hashing"]["1024 KiB chunks"]
    figures["hashing_reading"] = (
        f"At the worker's {worker_speed:,.0f} MB/s, hashing as it streams costs about "
        f"{worker_speed / hash_speed:.0%} of a large download's time, on the same core. It stays: "
        "sha256 is in the contract (every result carries it, `sha256=` is checked before "
        "publishing), and hashing on the way avoids a second pass over the file, which for "
        f"1 GiB would cost {2**30 / 1e6 / hash_speed:.2f} s of hashing plus the read."
    )
    return figures


def _step(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
