"""Segmented downloads: one large body from an origin that caps each connection at 4 MB/s
(nginx's `limit_rate`), the worker with 8 segments against `aria2c -x8 -s8` and against the
worker with one connection, in the same rounds; then 1 GiB from the same nginx uncapped, 8
segments against one connection. Each worker is timed from submission to SUCCESS, with its
child's peak RSS. `python -m bench segments` measures this part alone and redraws the report."""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench.config import MIB, Config
from bench.large import Client, _worker_client
from bench.stack import Nginx, Stack, available, rotated, run_measured
from bench.stats import fmt, ratios, summary

CAP = 4_000_000  # bytes a second, each connection
SEGMENTS = 8
ARIA2_TARGET = 1.25  # the worker's wall time against aria2c's, at most
SINGLE_TARGET = 1 / 6  # against one connection's, at most
ARIA2, ARIA2_K = "aria2c -x8 -s8", "aria2c -x8 -s8 -k1M"
SETTINGS = {"DOWNLOAD_SEGMENTS": str(SEGMENTS), "DOWNLOAD_SEGMENT_MIN": "64Mi",
            "WORKER_CONCURRENCY": "1"}  # fmt: skip


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    capped_size, big_size, rounds = (
        (64 * MIB, 256 * MIB, 1) if cfg.quick else (256 * MIB, 1024 * MIB, 3)
    )
    files = stack.work / "segment-files"
    _make(files / "capped.bin", capped_size)
    _make(files / "big.bin", big_size)
    nginx = Nginx(stack.work / "segment-nginx", files, extra=CAPPED_LOCATION).start()
    segmented = stack.worker("seg8", **SETTINGS)
    single = stack.worker("seg1", WORKER_CONCURRENCY="1")
    try:
        capped = _rounds(stack, rounds, {
            "worker, 8 segments": _worker_client(stack, segmented, f"{nginx.url}/capped/capped.bin",
                                                 capped_size),
            "worker, one connection": _worker_client(stack, single,
                                                     f"{nginx.url}/capped/capped.bin", capped_size),
            **_aria2(f"{nginx.url}/capped/capped.bin"),
        })  # fmt: skip
        uncapped = _rounds(stack, rounds + 2, {
            "worker, 8 segments": _worker_client(stack, segmented, f"{nginx.url}/big.bin",
                                                 big_size),
            "worker, one connection": _worker_client(stack, single, f"{nginx.url}/big.bin",
                                                     big_size),
        })  # fmt: skip
    finally:
        stack.stop_worker(segmented)
        stack.stop_worker(single)
        nginx.stop()
        shutil.rmtree(files, ignore_errors=True)
    return {
        "cap": CAP,
        "segments": SEGMENTS,
        "capped_bytes": capped_size,
        "uncapped_bytes": big_size,
        "rounds": rounds,
        "capped": capped,
        "uncapped": uncapped,
    }


CAPPED_LOCATION = f"location /capped/ {{ limit_rate {CAP}; alias {{root}}/; }}"


def _aria2(url: str) -> dict[str, Client]:
    """aria2c as asked for, and with -k1M: its default minimum split (20M, never a range under
    twice that) leaves it fewer than 8 connections for bodies under 320 MiB."""
    cmd = ["aria2c", "-q", f"-x{SEGMENTS}", f"-s{SEGMENTS}", "-o", "capped.bin",
           "--allow-overwrite=true"]  # fmt: skip
    found, _ = available({
        ARIA2: ("aria2c", lambda out: _timed([*cmd, url], out)),
        ARIA2_K: ("aria2c", lambda out: _timed([*cmd, "-k1M", url], out)),
    })  # fmt: skip
    return found


def _timed(cmd: list[str], out: Path) -> tuple[float, float, float | None]:
    seconds, peak_kib = run_measured(cmd, timeout=900, cwd=out)
    return seconds, peak_kib / 1024, None


def _rounds(stack: Stack, rounds: int, clients: Mapping[str, Client]) -> dict[str, Any]:
    """Each client once a round, in a rotated order; wall seconds and peak RSS per client."""
    seconds: dict[str, list[float]] = {name: [] for name in clients}
    peak: dict[str, list[float]] = {name: [] for name in clients}
    for r in range(rounds):
        round_dir = stack.work / "segments" / f"round-{r}"
        for i, name in enumerate(rotated(list(clients), r)):
            out = round_dir / f"{i}"
            out.mkdir(parents=True)
            os.sync()
            s, rss, _ = clients[name](out)
            seconds[name].append(s)
            peak[name].append(rss)
        shutil.rmtree(round_dir)
    first = "worker, 8 segments"
    return {
        "seconds": {k: summary(v) for k, v in seconds.items()},
        "peak_rss_mib": {k: summary(v) for k, v in peak.items()},
        "vs": {k: ratios(seconds[first], v) for k, v in seconds.items() if k != first},
        "raw": seconds,
    }


def _make(path: Path, size: int) -> None:
    """A file of `size` bytes that does not compress (random 1 MiB blocks, repeated)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(block)


def target_rows(s: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    vs, big = s["capped"]["vs"], s["uncapped"]
    size = f"{s['capped_bytes'] / MIB:g} MiB at {s['cap'] / 1e6:g} MB/s a connection"
    rows = []
    for peer in (ARIA2, ARIA2_K):
        if peer in vs:
            v = vs[peer]
            rows.append((f"{size}: 8 segments' wall time against {peer}'s",
                         f"<= {ARIA2_TARGET:g} x", f"{fmt(v, 2)} x",
                         v["median"] <= ARIA2_TARGET))  # fmt: skip
    one = vs["worker, one connection"]
    rows.append((f"{size}: 8 segments' wall time against one connection's",
                 f"<= 1/{1 / SINGLE_TARGET:g} ({SINGLE_TARGET:.3f}) x", f"{fmt(one, 3)} x",
                 one["median"] <= SINGLE_TARGET))  # fmt: skip
    u = big["vs"]["worker, one connection"]
    alone = big["seconds"]["worker, one connection"]
    spread = (alone["max"] - alone["min"]) / alone["median"]
    rows.append((f"{s['uncapped_bytes'] / MIB:g} MiB uncapped: 8 segments' wall time against "
                 "one connection's", f"<= 1 x + one connection's spread ({spread:.0%})",
                 f"{fmt(u, 2)} x", u["median"] <= 1 + spread))  # fmt: skip
    return rows


def render(s: Mapping[str, Any]) -> str:
    how = (
        f"One body of {s['capped_bytes'] / MIB:g} MiB from nginx with `limit_rate "
        f"{s['cap']}` (each connection capped at {s['cap'] / 1e6:g} MB/s): the worker with "
        f"`DOWNLOAD_SEGMENTS={s['segments']}`, the same worker code with one connection, and "
        f"`aria2c -x{s['segments']} -s{s['segments']}`, in a rotated order each round. Then "
        f"{s['uncapped_bytes'] / MIB:g} MiB from the same nginx without a cap, segmented "
        "against one connection. Workers are timed from submission to SUCCESS (the file "
        "hashed, fsynced and renamed), with the peak RSS of the child that downloaded. Medians "
        f"(min-max) of {s['rounds']} rounds (uncapped: {s['rounds'] + 2}). Measured on its own "
        "(`python -m bench segments`)."
    )
    rows = []
    for part, label in (("capped", "capped"), ("uncapped", "uncapped")):
        figures = s[part]
        for name, secs in figures["seconds"].items():
            rows.append((f"{label}: {name}, s", fmt(secs, 2)))
            rows.append((f"{label}: {name}, peak RSS MiB", fmt(figures["peak_rss_mib"][name], 1)))
        for name, v in figures["vs"].items():
            rows.append((f"{label}: 8 segments / {name}", fmt(v, 3)))
    table = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(["## 11. Segmented downloads", "", how, "", *table, ""])
