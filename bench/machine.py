"""What the figures were measured on: date, machine, load, and every version that matters."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

PACKAGES = ("celery", "kombu", "billiard", "redis", "requests", "urllib3")
TOOLS = {
    "redis-server": ["redis-server", "--version"],
    "nginx": ["nginx", "-v"],
    "curl": ["curl", "--version"],
    "wget": ["wget", "--version"],
    "aria2c": ["aria2c", "--version"],
    "py-spy": [str(Path(sys.executable).parent / "py-spy"), "--version"],
}


def describe() -> dict[str, object]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": _cpu(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in PACKAGES},
        "tools": {name: _tool(cmd) for name, cmd in TOOLS.items()},
        "load_at_start": load(),
    }


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def _tool(cmd: list[str]) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (done.stdout or done.stderr).strip().splitlines()
    return text[0][:80] if text else "unknown"
