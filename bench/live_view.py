"""Live view section: the CPU the `downloads` command itself spends drawing `submit --wait` on a
terminal (a pseudo-terminal), against the same batch with its output piped, where nothing is
drawn. The origin sends each body slowly, so the view runs for a while with many bars moving."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from bench.config import Config
from bench.stack import Stack
from tests.harness import ROOT, worker_env
from tests.server import OriginServer

CPU_TARGET = 0.05  # of one core, on a terminal
BYTES, RATE = 200_000, 100_000  # each download: 200 kB sent over about two seconds
SLOTS = 8


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    downloads = 60 if cfg.quick else 300
    origin = OriginServer().start()
    w = stack.worker("view", WORKER_CONCURRENCY=str(SLOTS))
    try:
        env = worker_env(stack.redis.url, stack.work / "view-cli")
        env.update(TERM="xterm-256color", COLUMNS="160", LINES="40")
        figures = {}
        for kind in ("terminal", "pipe"):
            tag = uuid.uuid4().hex[:8]
            urls = [
                f"{origin.url}/bytes/{BYTES}?rate={RATE}&seed={tag}{i}" for i in range(downloads)
            ]
            args = [sys.executable, "-m", "download_client.cli", "submit", *urls]
            args += ["--queue", w.queue, "--wait"]
            figures[kind] = _measured(args, env, terminal=kind == "terminal")
    finally:
        stack.stop_worker(w)
        origin.stop()
    return {"downloads": downloads, "slots": SLOTS, "bytes": BYTES, "rate": RATE, **figures}


def _measured(args: list[str], env: dict[str, str], terminal: bool) -> dict[str, float]:
    """Run the command to its end; its CPU seconds (user + system, from the kernel's account
    of the exited process) and wall seconds."""
    primary, secondary = pty.openpty() if terminal else os.pipe()
    started = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=secondary, stderr=secondary, stdin=subprocess.DEVNULL
    )
    os.close(secondary)
    reader = threading.Thread(target=_drain, args=(primary,), daemon=True)
    reader.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    reader.join(10)
    os.close(primary)
    if proc.returncode != 0:
        raise RuntimeError(f"downloads submit --wait exited {proc.returncode}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"cpu_s": cpu, "wall_s": wall, "cpu_share": cpu / wall}


def _drain(fd: int) -> None:
    while True:
        try:
            if not os.read(fd, 65536):
                return
        except OSError:  # a pseudo-terminal's other side closed (Linux: EIO)
            return


def render(v: Mapping[str, Any]) -> str:
    term, pipe = v["terminal"], v["pipe"]
    return f"""## 6. The live view's cost

`downloads submit URL... --wait` for {v["downloads"]} downloads of {v["bytes"] / 1000:.0f} kB,
each sent by the origin at {v["rate"] / 1000:.0f} kB/s, to one worker with {v["slots"]} slots;
the command's own CPU (user + system, as the kernel accounts the exited process) over its wall
time. On a terminal (a pseudo-terminal) it draws the live view; piped, it draws nothing.

| output | CPU s | wall s | share of one core |
|---|---|---|---|
| terminal | {term["cpu_s"]:.2f} | {term["wall_s"]:.1f} | {term["cpu_share"]:.1%} |
| pipe | {pipe["cpu_s"]:.2f} | {pipe["wall_s"]:.1f} | {pipe["cpu_share"]:.1%} |
"""
