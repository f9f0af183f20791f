"""The producers' environments that tests/test_client_install.py builds: what a service installs
beside its own code, from wheels downloaded once by `make test` (`python -m tests.wheelhouse`),
so the tests themselves never reach past loopback and build their venvs in seconds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import ROOT

WHEELHOUSE = ROOT / ".venv" / "wheelhouse"
CLIENT = ROOT / "client"
# A service that pins its own `packaging`, another release than kombu 5.7's redis extra pins
# (26.3): the client must not force kombu's pin on it.
SERVICE_PINS = ["packaging==25.0"]
# Each producer environment: what is asked of pip besides the client (or, for "bare", instead
# of it: the README's install line for a service that imports nothing of ours).
ENVS: dict[str, list[str]] = {
    # The lowest Celery the client's range admits, with the kombu it came with.
    "lowest": ["celery==5.6.0", "kombu==5.6.0", *SERVICE_PINS],
    # The newest Celery of the range on the day the wheelhouse was filled.
    "newest": ["celery>=5.6,<6", *SERVICE_PINS],
    "bare": ["celery[redis]>=5,<6"],
}


def folder(env: str) -> Path:
    return WHEELHOUSE / env


def fill() -> None:
    """Download every environment's wheels (the client's dependencies resolved with it)."""
    for env, wants in ENVS.items():
        client = [] if env == "bare" else [str(CLIENT)]
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-build-isolation"]
        subprocess.run(
            [*pip, "-d", str(folder(env)), *client, *wants],
            check=True,
        )


if __name__ == "__main__":
    fill()
