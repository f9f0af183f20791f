"""Third-party producers, run as separate processes that import nothing of this project: a bare
Celery app (tests/producers/bare_producer.py), the `celery call` command with no app, and
celery-node (npm, tests/node/) in task protocols 2 and 1."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT

NODE_DIR = ROOT / "tests" / "node"
BARE = ROOT / "tests" / "producers" / "bare_producer.py"


def clean_env() -> dict[str, str]:
    """No PYTHONPATH and no settings: what a process of another service has."""
    return {
        k: v
        for k, v in os.environ.items()
        if k != "PYTHONPATH" and not k.startswith(("CELERY_", "DOWNLOAD_"))
    }


def bare_producer(broker: str, backend: str, queue: str, timeout: float = 30, **kwargs: Any) -> Any:
    with tempfile.TemporaryDirectory() as cwd:  # away from the project, so nothing of it is found
        done = subprocess.run(
            [
                sys.executable,
                "-I",
                str(BARE),
                broker,
                backend,
                queue,
                json.dumps(kwargs),
                str(timeout),
            ],
            cwd=cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def celery_call(broker: str, backend: str, queue: str, kwargs: dict[str, Any]) -> str:
    """`celery call` with no app: prints the new task's id."""
    celery = Path(sys.executable).with_name("celery")
    with tempfile.TemporaryDirectory() as cwd:
        done = subprocess.run(
            [
                str(celery),
                "-b",
                broker,
                "--result-backend",
                backend,
                "call",
                "downloads.fetch",
                "--kwargs",
                json.dumps(kwargs),
                "--queue",
                queue,
            ],
            cwd=cwd,
            env=clean_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def node_ready() -> Path:
    """The node binary, with celery-node installed in tests/node/ (`npm ci`, once, under a lock
    shared by parallel test processes); skips the test only when node itself is absent."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed (.ci/run installs nodejs and npm from Debian)")
    with (NODE_DIR / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (NODE_DIR / "node_modules" / "celery-node").is_dir():
            npm = shutil.which("npm")
            assert npm is not None, "node without npm: install npm (.ci/run does)"
            subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300
            )
    return Path(node)


def celery_node(
    broker: str, backend: str, queue: str, protocol: int, timeout: float = 30, **kwargs: Any
) -> Any:
    node = node_ready()
    job = {
        "broker": broker,
        "backend": backend,
        "queue": queue,
        "protocol": protocol,
        "kwargs": kwargs,
        "timeout_ms": int(timeout * 1000),
    }
    done = subprocess.run(
        [str(node), "produce.js", json.dumps(job)],
        cwd=NODE_DIR,
        capture_output=True,
        text=True,
        timeout=timeout + 30,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)
