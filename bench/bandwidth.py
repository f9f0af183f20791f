"""Bandwidth budgets: a fleet-wide budget of 5 MB/s for one origin across 3 workers (4 slots
each) running 12 downloads from it, the rate counted at the origin over 20 s once the socket
buffers have filled (bench/metered.py); and a download from another origin, without a budget,
timed during that run against the same download alone. `python -m bench bandwidth` measures
this part alone and redraws the report."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from bench.config import MIB, Config
from bench.metered import MeteredOrigin, rate
from bench.stack import Stack, send_all, wait_all
from bench.stats import fmt, ratios, summary
from download_client.contract import TASK_NAME
from tests.harness import Worker

BUDGET = 5_000_000  # bytes a second
WORKERS, SLOTS, DOWNLOADS = 3, 4, 12
TARGET = 0.10  # the origin's rate within 10 % of the budget


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    rounds, size, warm, window = (1, 8 * MIB, 3.0, 5.0) if cfg.quick else (3, 20 * MIB, 10.0, 20.0)
    other_size = 16 * MIB if cfg.quick else 64 * MIB
    origin, other = MeteredOrigin(), MeteredOrigin()
    queue = f"bw-{uuid.uuid4().hex[:6]}"
    budgets = {"DOWNLOAD_HOST_RATES": f"{origin.url}={BUDGET}", "DOWNLOAD_HOST_CONCURRENCY": "0"}
    fleet = [
        stack.worker(f"bw{i}", queue=queue, WORKER_CONCURRENCY=str(SLOTS), **budgets)
        for i in range(WORKERS)
    ]
    # The other origin's download on a worker of its own: the fleet's slots are all taken.
    solo = stack.worker("bw-other", WORKER_CONCURRENCY="1", **budgets)
    rates: list[float] = []
    alone: list[float] = []
    loaded: list[float] = []
    try:
        for r in range(rounds):
            alone.append(_speed(stack, solo, f"{other.url}/{other_size}/alone{r}", f"o{r}a"))
            rates_r, loaded_r = _round(stack, fleet[0], solo, origin, other, r, size, other_size,
                                       warm, window)  # fmt: skip
            rates.append(rates_r)
            loaded.append(loaded_r)
    finally:
        for w in [*fleet, solo]:
            stack.stop_worker(w)
        origin.stop()
        other.stop()
    return {
        "budget": BUDGET, "workers": WORKERS, "slots": SLOTS, "downloads": DOWNLOADS,
        "size": size, "warm_s": warm, "window_s": window, "rounds": rounds,
        "origin_mb_per_s": summary([x / 1e6 for x in rates]),
        "rate_vs_budget": summary([x / BUDGET for x in rates]),
        "other_size": other_size,
        "other_mb_per_s": {"alone": summary(alone), "during": summary(loaded)},
        "other_during_vs_alone": ratios(loaded, alone),
    }  # fmt: skip


def _round(
    stack: Stack, w: Worker, solo: Worker, origin: MeteredOrigin, other: MeteredOrigin, r: int,
    size: int, other_size: int, warm: float, window: float,
) -> tuple[float, float]:  # fmt: skip
    """The budgeted origin's rate over the window, and the other origin's MB/s inside it."""
    kwargs = ({"url": f"{origin.url}/{size}/r{r}-{i}", "dest": f"bw/{r}/{i}.bin"}
              for i in range(DOWNLOADS))  # fmt: skip
    started = time.time()
    batch = send_all(stack.client, TASK_NAME, w.queue, kwargs)
    time.sleep(warm)  # the socket buffers fill: the origin's rate before it is not the budget's
    during = _speed(stack, solo, f"{other.url}/{other_size}/during{r}", f"o{r}d")
    wait_all(batch, timeout=600)
    samples = origin.sent() or []
    return rate(samples, started + warm, started + warm + window), during


def _speed(stack: Stack, w: Worker, url: str, dest: str) -> float:
    """MB/s of one download, by its own clock (the result's `elapsed_s`)."""
    (result,) = send_all(stack.client, TASK_NAME, w.queue, [{"url": url, "dest": f"bw/{dest}"}])
    wait_all([result], timeout=600)
    got = result.result
    return float(got["size"]) / float(got["elapsed_s"]) / 1e6


def target_row(b: Mapping[str, Any]) -> tuple[str, str, str, bool]:
    v = b["rate_vs_budget"]
    return (
        f"a budget of {b['budget'] / 1e6:g} MB/s for one origin, {b['workers']} workers, "
        f"{b['downloads']} downloads: the origin's rate against it",
        f"within {TARGET:.0%}",
        f"{fmt(v, 3)} x",
        abs(v["median"] - 1) <= TARGET
        and abs(v["min"] - 1) <= TARGET
        and abs(v["max"] - 1) <= TARGET,
    )


def render(b: Mapping[str, Any]) -> str:
    mb = b["other_mb_per_s"]
    how = (
        f"`DOWNLOAD_HOST_RATES` gives one origin a budget of {b['budget'] / 1e6:g} MB/s for the "
        f"whole fleet: {b['workers']} workers of {b['slots']} slots on one queue run "
        f"{b['downloads']} downloads of {b['size'] / MIB:g} MiB from it at once (no "
        "per-origin cap). The origin (`bench/metered.py`, a process of its own) counts what it "
        f"writes every quarter second; its rate is read over {b['window_s']:g} s starting "
        f"{b['warm_s']:g} s after the first download was sent, once the socket buffers are "
        "full (before that, the bytes that fill them leave the origin faster than the downloads "
        f"take them). Meanwhile one download of {b['other_size'] / MIB:g} MiB from another "
        "origin, which has no budget, on a worker of its own (the fleet's slots are all taken), "
        "against the same download alone before it. Medians "
        f"(min-max) of {b['rounds']} rounds. Measured on its own (`python -m bench "
        "bandwidth`), after the run of the parts above."
    )
    rows = [
        ("the origin's rate, MB/s", fmt(b["origin_mb_per_s"], 3)),
        ("the origin's rate / the budget", fmt(b["rate_vs_budget"], 3)),
        ("the other origin alone, MB/s", fmt(mb["alone"])),
        ("the other origin during the budgeted run, MB/s", fmt(mb["during"])),
        ("during / alone", fmt(b["other_during_vs_alone"], 2)),
    ]
    table = ["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return "\n".join(["## 10. Bandwidth budgets", "", how, "", *table, ""])
