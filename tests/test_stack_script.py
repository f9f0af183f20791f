"""`make run`'s script refuses what it cannot run with, in one line and before starting anything."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def stack(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/stack.sh"],
        cwd=ROOT,
        env={**os.environ, "PY": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_setting_is_one_line_and_starts_nothing():
    done = stack(DOWNLOAD_READ_TIMEOUT="abc")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "error: DOWNLOAD_READ_TIMEOUT='abc': could not convert string to float: 'abc'"
    )
    assert "flower:" not in done.stdout


def test_a_taken_flower_port_is_reported_before_starting():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = stack(FLOWER_PORT=str(port))
    assert done.returncode == 2
    assert f"127.0.0.1:{port} is taken" in done.stderr and "FLOWER_PORT=" in done.stderr


def test_a_broker_that_is_not_redis_without_a_result_backend_is_one_line():
    done = stack(CELERY_BROKER_URL="amqp://guest:hunter2@127.0.0.1:1//", CELERY_RESULT_BACKEND="")
    assert done.returncode == 2
    assert done.stderr.startswith("error: CELERY_RESULT_BACKEND is required")
    assert "hunter2" not in done.stderr and "flower:" not in done.stdout
