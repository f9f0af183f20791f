"""Fair shares between submitter groups: a worker of 16 slots against one origin with 8 slots
(the default cap), both groups backlogged. Group `heavy` holds a slot ten times as long as group
`light` (640 KiB after 2.5 s against 64 KiB after 250 ms). Slot time is counted at the origin:
each request's span, clipped to a window that starts once both groups wait for its slots. With
DOWNLOAD_GROUP_WEIGHTS=heavy=3,light=1 the split should be 3:1; the peer, in the same run, is
the same fleet with equal weights (1:1). `python -m bench groups` measures this part alone and
redraws the report."""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery

from bench.config import KIB, Config
from bench.delayed import DelayedOrigin
from bench.stack import Stack
from bench.stats import fmt, summary
from download_client.client import submit_many
from tests.harness import Worker, wait_for

SLOTS = 16
HEAVY, LIGHT = ("heavy", 2500, 640 * KIB), ("light", 250, 64 * KIB)
MODES = {"weights 3:1": "heavy=3,light=1", "equal weights (peer)": ""}
ALONE = " Measured on its own (`python -m bench groups`), after the run of the parts above."


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    # The warm-up lets the worker park both backlogs first (thousands of messages on two cores).
    warmup, window, rounds = (15, 20, 1) if cfg.quick else (30, 60, 2)
    shares: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(rounds):
        for mode, weights in MODES.items():
            log = stack.work / f"groups-{r}-{len(shares[mode])}-{mode[0]}.log"
            origin = DelayedOrigin(str(log))
            w = stack.worker("groups", WORKER_CONCURRENCY=str(SLOTS),
                             DOWNLOAD_GROUP_WEIGHTS=weights)  # fmt: skip
            try:
                shares[mode].append(_ratio(stack.client, w, origin, log, warmup, window))
            finally:
                stack.stop_worker(w)
                origin.stop()
    return {"slots": SLOTS, "cap": 8, "window_s": window, "rounds": rounds,
            "heavy_to_light": {mode: summary(s) for mode, s in shares.items()}}  # fmt: skip


def _ratio(
    app: Celery, w: Worker, origin: DelayedOrigin, log: Path, warmup: float, window: float
) -> float:
    """Slot time heavy : light over `window` seconds, once both have waited `warmup`. Each run
    downloads to destinations of its own: a purged download keeps its destination's claim until
    the claim's lease ends, and a later download to it would wait for that."""
    # Enough of each to stay backlogged through the window at an equal share or heavy's 3:1, and
    # no more: every message beyond parks, and parking costs the same two cores.
    span = warmup + window
    n = {HEAVY[0]: int(span * 6 / 2.5) + 20, LIGHT[0]: int(span * 4 / 0.25 * 1.1)}
    for name, ms, size in (HEAVY, LIGHT):
        base = origin.url(ms, size)
        items = [{"url": f"{base}/{name}-{i}", "dest": f"groups/{log.stem}/{name}/{i}"}
                 for i in range(n[name])]  # fmt: skip
        submit_many(app, items, queue=w.queue, group=name)
    start = time.time() + warmup
    end = start + window
    wait_for(lambda: time.time() >= end, warmup + window + 30, "the window to pass")
    held = {HEAVY[0]: 0.0, LIGHT[0]: 0.0}
    for line in log.read_text().splitlines():
        name, began, ended = line.split()
        group = name.split("-", 1)[0]
        if group in held:
            held[group] += max(0.0, min(float(ended), end) - max(float(began), start))
    _purge(app, w)
    return held[HEAVY[0]] / held[LIGHT[0]]


def _purge(app: Celery, w: Worker) -> None:
    """The rest of both backlogs goes: queued, and parked in Redis."""
    with app.connection_for_write() as conn:
        for name in (HEAVY[0], LIGHT[0]):
            conn.default_channel.queue_purge(f"{w.queue}.group-{name}")
    client = app.backend.client
    for key in client.scan_iter(match="downloads:origin:*:parked-*"):
        client.delete(key)
    for key in client.scan_iter(match="downloads:origin:*:groups"):
        client.delete(key)


def render(groups: Mapping[str, Any]) -> str:
    lines = [
        "## 9. Fair shares between groups",
        "",
        f"A worker of {groups['slots']} slots against one origin with {groups['cap']} slots (the "
        "default cap), two groups both backlogged: `heavy` holds a slot ten times as long as "
        f"`light` (640 KiB after 2.5 s against 64 KiB after 250 ms). Slot time heavy : light, "
        f"counted at the origin over {groups['window_s']} s once both wait for its slots, with "
        "`DOWNLOAD_GROUP_WEIGHTS=heavy=3,light=1` and, the peer, with equal weights. Medians "
        f"(min-max) of {groups['rounds']} rounds.{ALONE if groups.get('alone') else ''}",
        "",
        "| fleet | heavy : light slot time |",
        "|---|---|",
    ]
    for mode, s in groups["heavy_to_light"].items():
        lines.append(f"| {mode} | {fmt(s, 2)} |")
    lines += [
        "",
        "The split follows the weights, not the bodies: with equal weights `light` starts ten "
        "downloads for each of `heavy`'s and both hold the origin's slots about as long; with "
        "3:1, `heavy` holds them three times as long.",
    ]
    return "\n".join(lines) + "\n"
