"""`make run`'s readiness checks (scripts/stack.sh): wait until a component answers, or stop
waiting when its process has exited or the time is up.

    python -m scripts.ready worker PID        the worker answers a ping
    python -m scripts.ready flower PORT PID   Flower answers /healthcheck on 127.0.0.1:PORT

Exit status 0: it answers; 1: it exited or did not answer in time; 130: interrupted (Ctrl-C)."""

from __future__ import annotations

import os
import socket
import sys
import time
import urllib.request
from collections.abc import Callable

WAIT_S = 120.0  # a first start on a slow machine imports a lot; a dead process ends it earlier


def running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait(pid: int, answers: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while running(pid) and time.monotonic() < deadline:
        if answers():
            return True
        time.sleep(0.2)
    return False


def worker_answers() -> Callable[[], bool]:
    """A ping to this host's default worker name (celery@<hostname>, what `make run` starts)."""
    from worker import app

    node = f"celery@{socket.gethostname()}"

    def ping() -> bool:
        try:
            return bool(app.control.ping(destination=[node], timeout=1))
        except OSError:  # Redis not reachable for a moment: ask again
            return False

    return ping


def flower_answers(port: int) -> Callable[[], bool]:
    url = f"http://127.0.0.1:{port}/healthcheck"  # never behind basic auth

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False

    return healthy


def main(argv: list[str]) -> int:
    try:
        if argv[:1] == ["worker"] and len(argv) == 2:
            return 0 if wait(int(argv[1]), worker_answers()) else 1
        if argv[:1] == ["flower"] and len(argv) == 3:
            return 0 if wait(int(argv[2]), flower_answers(int(argv[1]))) else 1
    except KeyboardInterrupt:  # Ctrl-C while starting: stack.sh stops everything
        return 130
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
