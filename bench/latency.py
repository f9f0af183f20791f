"""Latency section: an origin that waits before answering (time to first byte), this worker
at several slot counts against curl --parallel and aria2c at equal parallelism, and the worker's
PSS a slot (main process and children, from /proc/<pid>/smaps_rollup)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from statistics import median
from typing import Any

from bench.config import KIB, Config
from bench.delayed import DelayedOrigin
from bench.small import _aria2, _celery, _curl
from bench.stack import Stack, available, rotated, send_all, wait_all
from bench.stats import fmt, ratios, summary
from download_client.contract import TASK_NAME
from tests.harness import Worker

TTFB_MS = (20, 100, 300)
NOOP_HOLD_S = 0.1
PLOT = "bench-latency.png"


def rollup_kib(pid: int) -> dict[str, int]:
    """The kB fields of /proc/<pid>/smaps_rollup (Pss, Private_Clean, Private_Dirty...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0])
    return out


def memory_of(w: Worker, slots: int) -> dict[str, float]:
    """The whole worker's PSS a slot, and per child the median USS (what only it holds) and
    Private_Dirty (what it wrote into pages of its own: after fork, copies of the parent's)."""
    assert w.proc is not None
    children = [rollup_kib(p) for p in w.children()]
    main = rollup_kib(w.proc.pid)
    return {
        "pss_per_slot_mib": (main["Pss"] + sum(c["Pss"] for c in children)) / slots / KIB,
        "uss_per_child_mib": median([c["Private_Clean"] + c["Private_Dirty"] for c in children])
        / KIB,
        "private_dirty_per_child_mib": median([c["Private_Dirty"] for c in children]) / KIB,
    }


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    slot_counts = (2, 8) if cfg.quick else (2, 8, 32)
    rounds, waves = (1, 3) if cfg.quick else (3, 6)
    origin = DelayedOrigin()  # its own process: it must not share this one's interpreter
    table: dict[str, Any] = {}
    try:
        for slots in slot_counts:
            table[str(slots)] = _slots(stack, origin, slots, rounds, waves)
    finally:
        origin.stop()
    most = slot_counts[-1]
    tasks = table[str(most)]["downloads_done"]
    noop = {"slots": most, "tasks": tasks, **_noop_memory(stack, most, tasks)}
    return {"rounds": rounds, "ttfb_ms": list(TTFB_MS), "by_slots": table, "noop": noop}


def _noop_memory(stack: Stack, slots: int, tasks: int) -> dict[str, Any]:
    """The same memory figures for Celery's own work alone: a worker of as many slots running as
    many no-op tasks, each holding its child for NOOP_HOLD_S so that every child runs its share
    (a no-op that returns at once is taken by whichever child is free first)."""
    w = stack.worker(f"latnoop{slots}", include=["bench.tasks"], WORKER_CONCURRENCY=str(slots))
    try:
        time.sleep(2)  # the children finish starting, as for the downloads' worker
        idle = memory_of(w, slots)
        kwargs = ({"hold_s": NOOP_HOLD_S, "n": i} for i in range(tasks))
        wait_all(send_all(stack.client, "bench.noop_as_long", w.queue, kwargs), timeout=600)
        return {"idle": idle, "after": memory_of(w, slots)}
    finally:
        stack.stop_worker(w)


def _slots(
    stack: Stack, origin: DelayedOrigin, slots: int, rounds: int, waves: int
) -> dict[str, Any]:
    # Every slot at the one delayed origin, with no per-origin cap (0): the peers have none.
    w = stack.worker(f"lat{slots}", WORKER_CONCURRENCY=str(slots), DOWNLOAD_HOST_CONCURRENCY="0")
    n = slots * waves  # every slot busy for `waves` downloads in a row
    names = [f"f{i:04d}.bin" for i in range(n)]
    out: dict[str, Any] = {}
    try:
        time.sleep(2)  # the children finish starting
        out["idle"] = memory_of(w, slots)
        # Not timed: every child opens its connection and imports what it imports lazily first.
        warm = [f"{origin.url(0)}/{name}" for name in names]
        _celery(stack, w, TASK_NAME, warm, f"lat/{slots}/warm", n)
        for ms in TTFB_MS:
            urls = [f"{origin.url(ms)}/{name}" for name in names]
            out[str(ms)] = _cell(stack, w, slots, urls, names, rounds, f"lat/{slots}/{ms}")
        # After the runs: every child has served downloads and dirtied what it dirties.
        out["after"] = memory_of(w, slots)
        out["downloads_done"] = n * (1 + len(TTFB_MS) * rounds)
        out["pss_per_slot_mib"] = out["after"]["pss_per_slot_mib"]
    finally:
        stack.stop_worker(w)
    return out


def _cell(
    stack: Stack,
    w: Worker,
    slots: int,
    urls: list[str],
    names: list[str],
    rounds: int,
    prefix: str,
) -> dict[str, Any]:
    work = stack.work / prefix
    work.mkdir(parents=True)
    (work / "urls.txt").write_text("".join(u + "\n" for u in urls))
    n = len(urls)
    parallel = ("-Z", "--parallel-max", str(slots))
    clients = {
        "worker": lambda out, r: _celery(stack, w, TASK_NAME, urls, f"{prefix}/w{r}", n),
        "curl --parallel": lambda out, r: _curl(out, urls, names, *parallel),
    }
    found, _ = available(
        {f"aria2c -j{slots}": ("aria2c", lambda out, r: _aria2(out, work / "urls.txt", slots))}
    )
    clients.update(found)
    rates: dict[str, list[float]] = {k: [] for k in clients}
    for r in range(rounds):
        for name in rotated(list(clients), r):
            out = work / f"{r}-{list(clients).index(name)}"
            out.mkdir()
            rates[name].append(n / clients[name](out, r))
    return {
        "files_per_s": {k: summary(v) for k, v in rates.items()},
        "worker_vs_curl": ratios(rates["worker"], rates["curl --parallel"]),
    }


def render(lat: Mapping[str, Any]) -> str:
    lines = [
        "## 5. Latency: slots against time to first byte",
        "",
        f"![files/s against slots]({PLOT})",
        "",
        "16 KiB files from an origin that answers after the given delay; medians (min-max) over "
        f"{lat['rounds']} rounds. The origin runs in a process of its own. The worker's PSS "
        "(main process and children) a slot idle (started, no download yet) and after the runs; "
        "USS and Private_Dirty: the median child, idle -> after.",
        "",
        "| slots | PSS a slot idle -> after (MiB) | USS a child | Private_Dirty a child "
        "| TTFB | worker files/s | curl --parallel | worker / curl |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for slots, row in lat["by_slots"].items():
        for ms in lat["ttfb_ms"]:
            cell = row[str(ms)]
            rates = cell["files_per_s"]
            lines.append(
                f"| {slots} | {_mem(row, 'pss_per_slot_mib')} | {_mem(row, 'uss_per_child_mib')} "
                f"| {_mem(row, 'private_dirty_per_child_mib')} | {ms} ms "
                f"| {fmt(rates['worker'], 1)} | {fmt(rates['curl --parallel'], 1)} "
                f"| {fmt(cell['worker_vs_curl'], 2)} |"
            )
    noop = lat.get("noop")
    if noop:
        lines += [
            "",
            f"The no-op peer (`bench.noop_as_long`, each task asleep {NOOP_HOLD_S * 1000:.0f} ms "
            f"in its child so that every child runs its share): {noop['slots']} slots, "
            f"{noop['tasks']:,} tasks, PSS a slot {_mem(noop, 'pss_per_slot_mib')} MiB, USS a "
            f"child {_mem(noop, 'uss_per_child_mib')} MiB, Private_Dirty a child "
            f"{_mem(noop, 'private_dirty_per_child_mib')} MiB: what a child of Celery alone "
            "writes into pages it shared with the main process by running tasks.",
        ]
    return "\n".join(lines) + "\n"


def _mem(row: Mapping[str, Any], key: str) -> str:
    """`idle -> after` where the run measured both (reports before them show one figure)."""
    if "idle" not in row:
        return f"{row[key]:.1f}" if key in row else "-"
    return f"{row['idle'][key]:.1f} -> {row['after'][key]:.1f}"


def plot(lat: Mapping[str, Any], docs: Path, plt: Any) -> None:
    """files/s against slots, one line per client and delay (`plt`: matplotlib.pyplot)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    slots = [int(s) for s in lat["by_slots"]]
    for ms in lat["ttfb_ms"]:
        for client, style in (("worker", "-o"), ("curl --parallel", "--x")):
            ys = [lat["by_slots"][str(s)][str(ms)]["files_per_s"][client]["median"] for s in slots]
            ax.plot(slots, ys, style, label=f"{client}, {ms} ms")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("slots (parallel downloads)")
    ax.set_ylabel("files/s (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / PLOT, dpi=100)
    plt.close(fig)
