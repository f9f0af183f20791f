"""Where a 16 KiB download's time goes in a worker child (py-spy, sampling, no changes
to the process), and micro-figures for the choices of hashing and progress throttling."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, cast

from celery import Celery, Task

from bench.stack import Stack, send_all, wait_all
from download_client.contract import TASK_NAME
from download_client.settings import Settings
from tasks.progress import Progress

ROOT = str(Path(__file__).resolve().parent.parent) + "/"
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
# Where a frame's file lives decides which layer pays for it.
# (A C call, os.fsync or a socket send, counts in the Python frame that made it.)
_LAYERS = (
    ("this project: tasks/, worker/ (disk calls included)", ("(tasks/", "(worker/")),
    ("requests + urllib3 + http.client", ("(requests/", "(urllib3/", "(http/client.py")),
    ("Celery, kombu, billiard", ("(celery/", "(kombu/", "(billiard/")),
    ("redis-py (result backend and broker calls)", ("(redis/",)),
    ("logging", ("(logging/",)),
    ("sockets", ("(socket.py", "(ssl.py", "(selectors.py")),
)


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.access(found, os.X_OK) else None


def run(stack: Stack, url: str, downloads: int) -> dict[str, Any]:
    """Profile one child of a 2-child worker while it downloads `downloads` files of 16 KiB."""
    binary = py_spy()
    if binary is None:
        return {"skipped": "py-spy is not installed (pip install py-spy)"}
    w = stack.worker(
        "profile",
        include=["bench.tasks"],
        WORKER_MAX_TASKS_PER_CHILD="0",
        WORKER_MAX_MEMORY_PER_CHILD="0",
    )
    out = stack.work / "profile.txt"
    try:
        child = w.children()[0]
        spy = subprocess.Popen(
            [binary, "record", "--pid", str(child), "--rate", "250", "--format", "raw"]  # noqa: RUF005
            + ["--nonblocking", "--output", str(out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches
        kwargs = ({"url": url, "dest": f"p4/{i}.bin"} for i in range(downloads))
        started = time.perf_counter()
        wait_all(send_all(stack.client, TASK_NAME, w.queue, kwargs), timeout=600)
        elapsed = time.perf_counter() - started
        spy.send_signal(signal.SIGINT)
        spy.wait(60)
    finally:
        stack.stop_worker(w)
    if not out.exists():
        return {"skipped": "py-spy could not attach (ptrace not permitted?)"}
    stacks = parse(out.read_text())
    return {**summarise(stacks), "downloads": downloads, "elapsed_s": elapsed}


def parse(text: str) -> Counter[tuple[str, ...]]:
    """py-spy's raw (collapsed) output: `frame;frame;... count`, outermost first."""
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames or not count.isdigit():
            continue
        names = []
        for frame in frames.split(";"):
            m = _FRAME.match(frame.strip())
            names.append(f"{m['func']} ({_short(m['file'])})" if m else frame.strip())
        stacks[tuple(names)] += int(count)
    return stacks


def _short(path: str) -> str:
    """A frame's file relative to the project or to site-packages / the standard library."""
    if path.startswith(ROOT):
        return path[len(ROOT) :]
    for marker in ("site-packages/", f"lib/python{sys.version_info[0]}.{sys.version_info[1]}/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def summarise(stacks: Counter[tuple[str, ...]], top: int = 18) -> dict[str, Any]:
    """Self share per layer, and the inclusive share of each function on the task's path (each
    function counted once per stack): the task body and what Celery does around it."""
    total = sum(stacks.values()) or 1
    inclusive: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    for frames, count in stacks.items():
        for name in set(frames):
            inclusive[name] += count
        layers[_layer(frames[-1]) if frames else "other"] += count
    path = [(n, c / total) for n, c in inclusive.most_common() if any(p in n for p in _PATH)]
    named = [(n, share) for n, share in path if not n.startswith(("trace_task", "build_tracer"))]
    return {
        "samples": total,
        "layers": [(name, n / total) for name, n in layers.most_common()],
        "path": path[:top],
        "reading": "Largest costs on the path (inclusive, nested ones overlap): "
        + ", ".join(f"`{n}` {share:.0%}" for n, share in named[1:7])
        + ".",
    }


# Frames worth naming on the per-task path: ours, the HTTP call, Celery's result writes.
_PATH = (
    "(tasks/",
    "(worker/",
    "trace_task (celery/app/trace.py)",
    "(celery/backends/base.py)",
    "Task.send_event",
    "Task.update_state",
    "Session.request (requests/",
    "HTTPAdapter.send (requests/",
)


def _layer(frame: str) -> str:
    for name, markers in _LAYERS:
        if any(m in frame for m in markers):
            return name
    return "other (stdlib: json, pathlib, typing...)"


def hashing(chunk: int, total: int = 512 * 2**20) -> float:
    """sha256 throughput in this process at `chunk` bytes per update, MB/s."""
    block = os.urandom(chunk)
    h = hashlib.sha256()
    started = time.perf_counter()
    for _ in range(total // chunk):
        h.update(block)
    return total / 1e6 / (time.perf_counter() - started)


def progress_cost(app: Celery, worker_mb_per_s: float, interval: float = 0.5) -> dict[str, float]:
    """What the PROGRESS throttle saves: the cost of a check that is not due, of a report that
    is (a result-backend write plus a task-progress event, as `Progress` does), and what that
    comes to for 1 GiB at the worker's measured speed, against reporting every chunk."""
    check = Progress(cast(Task, None), interval)
    chunks_per_gib = 2**30 / Settings.from_env().chunk_size
    n = 200_000
    started = time.perf_counter()
    for i in range(n):
        check(i, None)
    check_ns = (time.perf_counter() - started) / n * 1e9
    reports = 300
    with app.events.default_dispatcher(hostname="bench@progress") as events:
        started = time.perf_counter()
        for i in range(reports):
            tid = f"bench-progress-{i}"
            app.backend.store_result(tid, {"bytes": i, "total": None}, "PROGRESS")
            events.send("task-progress", uuid=tid, bytes=i, total=None)
        report_ms = (time.perf_counter() - started) / reports * 1000
    seconds_per_gib = 2**30 / 1e6 / worker_mb_per_s
    per_gib = seconds_per_gib / interval
    return {
        "check_ns": check_ns,
        "report_ms": report_ms,
        "reports_per_gib": per_gib,
        "share_per_gib": per_gib * report_ms / 1000 / seconds_per_gib,
        "every_chunk_ms_per_gib": chunks_per_gib * report_ms,
    }
