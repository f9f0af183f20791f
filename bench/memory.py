"""RSS of each worker child over many 16 KiB downloads, connections opened at the origin,
sockets left in TIME_WAIT and CPU per download, for this worker, the Session-per-download
anti-pattern and a leaking task with recycling off and on."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.config import Config
from bench.leaky import LEAK_BYTES
from bench.stack import (
    SMALL_BYTES,
    Nginx,
    Stack,
    cpu_seconds,
    rss_mib,
    send_all,
    status_kib,
    time_wait,
    wait_all,
)
from download_client.contract import TASK_NAME
from tests.harness import Worker

RECYCLE_OFF = {"WORKER_MAX_TASKS_PER_CHILD": "0", "WORKER_MAX_MEMORY_PER_CHILD": "0"}
LEAK_HEADROOM_MIB = 32  # recycling on: the cap sits this far above the parent's RSS


@dataclass(frozen=True)
class Variant:
    key: str
    label: str
    task: str
    include: str
    recycle_kib: int = 0  # WORKER_MAX_MEMORY_PER_CHILD; 0 is off


class _ChildWatch(threading.Thread):
    """Notes every child pid the worker has, every 20 ms, to count replacements."""

    def __init__(self, parent: int) -> None:
        super().__init__(daemon=True)
        self.parent, self.seen, self.stopping = parent, set[int](), threading.Event()

    def run(self) -> None:
        proc = psutil.Process(self.parent)
        while not self.stopping.wait(0.02):
            try:
                self.seen.update(c.pid for c in proc.children())
            except psutil.Error:
                return


@dataclass
class _Run:
    samples: list[dict[str, Any]] = field(default_factory=list)
    first: dict[int, float] = field(default_factory=dict)


def run(stack: Stack, cfg: Config, files: Path) -> dict[str, Any]:
    """`files` holds small/f0000.bin (16 KiB), served by a new nginx for each variant."""
    variants = [
        Variant("a", "this worker (one Session per child)", TASK_NAME, "bench.tasks"),
        Variant(
            "b", "anti-pattern: a Session per download", "bench.session_per_download", "bench.tasks"
        ),
        Variant("c-off", "leaking task, recycling off", "bench.leaky", "bench.leaky"),
    ]
    out: dict[str, Any] = {
        "downloads": cfg.many,
        "batch": cfg.batch,
        "body": SMALL_BYTES,
        "variants": [],
    }
    for v in variants:
        out["variants"].append(_measure(stack, cfg, v, files))
    # The cap sits above the main process's peak RSS, which each child inherits as its own
    # starting peak; a third of a child's expected leak above it, at most LEAK_HEADROOM_MIB.
    parent_mib = out["variants"][0]["parent_peak_mib"]
    headroom = min(LEAK_HEADROOM_MIB, cfg.many / 2 * LEAK_BYTES / 2**20 / 3)
    cap = int((parent_mib + headroom) * 1024)
    on = Variant("c-on", "leaking task, recycling on", "bench.leaky", "bench.leaky", cap)
    out["variants"].append(_measure(stack, cfg, on, files))
    return out


def _measure(stack: Stack, cfg: Config, v: Variant, files: Path) -> dict[str, Any]:
    # A new origin (and port) per variant: its accept count and TIME_WAIT sockets are this run's.
    origin = Nginx(stack.work / f"nginx-{v.key}", files).start()
    overrides = dict(RECYCLE_OFF)
    if v.recycle_kib:
        overrides["WORKER_MAX_MEMORY_PER_CHILD"] = str(v.recycle_kib)
    w = stack.worker(f"mem-{v.key}", include=[v.include], **overrides)
    try:
        return _drive(stack, cfg, v, w, origin)
    finally:
        stack.stop_worker(w)
        origin.stop()


def _drive(stack: Stack, cfg: Config, v: Variant, w: Worker, origin: Nginx) -> dict[str, Any]:
    assert w.proc is not None
    main = w.proc.pid
    children = w.children()
    idle = {pid: rss_mib(pid) for pid in children}
    watch = _ChildWatch(main)
    watch.start()
    cpu0, cpu_main0 = cpu_seconds(children), cpu_seconds([main])
    conns0 = origin.accepts()
    url = f"{origin.url}/small/f0000.bin"
    state = _Run()
    state.samples.append({"downloads": 0, "rss": sorted(idle.values())})
    started = time.perf_counter()
    for i in range(cfg.many // cfg.batch):
        kwargs = ({"url": url, "dest": f"p1/{v.key}/{i}/{j}.bin"} for j in range(cfg.batch))
        wait_all(send_all(stack.client, v.task, w.queue, kwargs), timeout=600)
        now = {c: rss_mib(c) for c in w.children()}
        if i == 0:
            state.first = dict(now)
        state.samples.append({"downloads": (i + 1) * cfg.batch, "rss": sorted(now.values())})
    elapsed = time.perf_counter() - started
    done = cfg.many // cfg.batch * cfg.batch
    waiting = time_wait(origin.port) - origin.status_calls
    conns = origin.accepts() - conns0 - 1  # less our own stub_status request
    watch.stopping.set()
    watch.join()
    last = {c: rss_mib(c) for c in w.children()}
    same = sorted(last) == sorted(children)
    return {
        "key": v.key,
        "label": v.label,
        "task": v.task,
        "recycle_kib": v.recycle_kib,
        "downloads": done,
        "samples": state.samples,
        "idle_mib": sorted(idle.values()),
        "growth_from_idle_mib": [last[p] - idle[p] for p in last if p in idle],
        "growth_after_first_batch_mib": [
            last[p] - state.first[p] for p in last if p in state.first
        ],
        "children_seen": len(watch.seen | set(children)),
        "connections": conns,
        "time_wait": waiting,
        "cpu_ms_per_download": (cpu_seconds(children) - cpu0) * 1000 / done if same else None,
        "parent_cpu_ms_per_download": (cpu_seconds([main]) - cpu_main0) * 1000 / done,
        "downloads_per_s": done / elapsed,
        "parent_peak_mib": status_kib(main, "VmHWM") / 1024,
        "final_max_mib": max(last.values()) if last else None,
    }
