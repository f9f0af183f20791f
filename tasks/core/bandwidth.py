"""Bandwidth budgets, fleet-wide: bytes per second from one origin (DOWNLOAD_HOST_RATE, or its
DOWNLOAD_HOST_RATES override) and from one worker in total (DOWNLOAD_WORKER_RATE), shared by
every worker on one Redis.

A budget is a rate, not an admission: a download is never refused or parked by it, it is
slowed. Each scope is a clock in Redis (tasks/core/ledger.py, `_PACE`); a download takes its
bytes from it as they arrive, a quantum at a time, and sleeps when the clock runs ahead of now by
more than TOLERANCE_S. While it sleeps it does not read its socket: TCP's flow control slows the
origin down to the rate once the socket buffers are full. Nothing is held between two takes, so
a download that dies gives nothing back and blocks nobody: it took only the bytes it received.

With Redis away, the bytes flow unpaced (a warning says so) and pacing is tried again after
QUIET_S: a budget is a courtesy to the origin, not worth failing a download for."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis

from download_client.records import RATE_TOLERANCE_S as TOLERANCE_S
from tasks.core.ledger import Ledger

QUANTUM_S = 0.02  # bytes taken from Redis at a time: this many seconds' worth of the rate...
QUANTUM_MIN, QUANTUM_MAX = 16 * 1024, 1024 * 1024  # ...within these bounds
QUIET_S = 1.0
WORKER = "worker "  # the scope of one worker's total: `worker <hostname>`

log = logging.getLogger(__name__)


@dataclass
class Pacer:
    """One download's bytes against its budgets: call it with each chunk's size."""

    ledger: Ledger
    scopes: tuple[tuple[str, int], ...]  # (scope, bytes per second)
    owed: int = 0  # received and not yet taken
    held_s: float = 0.0  # slept for the budgets so far
    quiet_until: float = 0.0
    taken: bool = False  # the first chunk is taken at once, so a small body waits its turn too

    quantum: int = 0  # bytes taken at a time, from the slowest budget's rate

    def __post_init__(self) -> None:
        slowest = min(rate for _, rate in self.scopes)
        self.quantum = max(QUANTUM_MIN, min(QUANTUM_MAX, int(slowest * QUANTUM_S)))

    def __call__(self, n: int) -> None:
        self.owed += n
        if self.owed >= self.quantum or not self.taken:
            self.taken = True
            self._take(wait=True)

    def close(self) -> None:
        """Take what the last chunks brought without waiting: the next bytes through the same
        budgets pay for them (at most a quantum a download)."""
        if self.owed:
            self._take(wait=False)

    def _take(self, wait: bool) -> None:
        n, self.owed = self.owed, 0
        if time.monotonic() < self.quiet_until:
            return
        try:
            wait_ms = self.ledger.pace(self.scopes, n, int(TOLERANCE_S * 1_000_000))
        except (redis.RedisError, OSError) as exc:
            log.warning("bandwidth budget not applied for %.0f s (%s)", QUIET_S, exc)
            self.quiet_until = time.monotonic() + QUIET_S
            return
        if wait and wait_ms > 0:
            time.sleep(wait_ms / 1000)
            self.held_s += wait_ms / 1000


def scopes(origin: str, origin_rate: int, worker: str, worker_rate: int) -> list[tuple[str, int]]:
    """The budgets a download from `origin` on `worker` is paced by (none: not paced)."""
    out = [(origin, origin_rate)] if origin_rate else []
    return out + ([(f"{WORKER}{worker}", worker_rate)] if worker_rate else [])


def pacer(ledger: Ledger, budgets: list[tuple[str, int]]) -> Pacer | None:
    return Pacer(ledger, tuple(budgets)) if budgets else None
