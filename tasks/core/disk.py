"""Disk reservations, fleet-wide: a weighted budget (tasks/core/budgets.py) whose scopes are
volumes and whose leases count bytes (no Celery here).

A volume is what one DOWNLOAD_DIR lives on, named by a marker file in its in-progress area
(`.partial/volume`, made by the first worker to use it): workers that share the directory (a
network file system) share the name, whatever their hosts call its device. Its capacity is
measured, never configured: the space free for unprivileged writers, less DOWNLOAD_DISK_MARGIN.

A lease counts the bytes its download has reserved and not yet written: what it wrote is
already gone from the free space, so counting it again would leave room unused. Each renewal
tells what is left of it; between renewals the lease counts more than is left, never less.

A download reserves what its body still needs once the headers say (Content-Length, less what
a partial already holds), or DOWNLOAD_DISK_STEP at a time while the size is unknown, and never
writes past what it holds. One that does not fit parks its message like a download waiting for
an origin slot: it holds no worker process and no origin slot meanwhile, and the partial it
has stays. A release, or the sweep once a second (a consumer may free space any time), wakes
the parked downloads whose need fits, in their turn."""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import redis

from download_client.arguments import PARTIAL_DIR
from download_client.errors import PermanentError, TransientError
from download_client.records import DISK_VOLUMES
from tasks.core.budgets import WAKING_STALE_MS, Budget, Seat
from tasks.core.ledger import Ledger

KIND = "disk"
MARKER = "volume"  # in `.partial/`: the sweep of the in-progress area leaves it alone
# How often a download that cannot grow, and whose origin cannot resume, looks for room again.
RETRY_ROOM_S = 0.5

_volumes: dict[str, str] = {}  # DOWNLOAD_DIR -> its volume's name, once read in this process


def volume_of(root: Path) -> str:
    """The name of the volume `root` is on, from its marker (made here if there is none)."""
    key = str(root)
    if key in _volumes:
        return _volumes[key]
    area = root / PARTIAL_DIR
    area.mkdir(parents=True, exist_ok=True)
    marker = area / MARKER
    try:
        name = marker.read_text().strip()
    except FileNotFoundError:
        name = _make_marker(marker)
    _volumes[key] = name
    return name


def _make_marker(marker: Path) -> str:
    """Write a new name beside the marker, then link it into place: of two workers racing, the
    first link wins and both read its name."""
    tmp = marker.with_name(f"{MARKER}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(f"vol-{uuid.uuid4().hex[:16]}\n")
    try:
        os.link(tmp, marker)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return marker.read_text().strip()


@dataclass(frozen=True)
class Volume:
    """DOWNLOAD_DIR's volume as measured now: its bytes free, its size, and the margin kept."""

    root: Path
    margin: int

    def measure(self) -> tuple[int, int]:
        """(bytes free for unprivileged writers, bytes the file system holds in all)."""
        st = os.statvfs(self.root / PARTIAL_DIR)
        return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize

    def room(self, _scope: str = "") -> int:
        """The capacity of the volume's budget: free space less the margin (at least 1: a
        capacity of 0 would mean no limit)."""
        return max(1, self.measure()[0] - self.margin)

    def budget(self) -> Budget:
        return Budget(KIND, self.room, measured=True)

    def sweep(self, ledger: Ledger) -> list[str]:
        """The volume measured now, noted for `downloads status` and the metrics, and the parked
        downloads that fit in it woken (space freed by a consumer wakes nobody else)."""
        name = volume_of(self.root)
        free, size = self.measure()
        room = max(1, free - self.margin)
        seen = {"path": str(self.root), "host": socket.gethostname(), "free": free,
                "size": size, "margin": self.margin, "at": round(time.time(), 3)}  # fmt: skip
        ledger.client.hset(DISK_VOLUMES, name, json.dumps(seen))
        budget = self.budget()
        return ledger.sweep(KIND, lambda scope: room if scope == name else 0, WAKING_STALE_MS,
                            budget.lease_ms, measured=(name,))  # fmt: skip


@dataclass
class Space:
    """One run's reservation on its volume. `reserve` takes what the body needs before it is
    read; the body then calls `more` before it writes past `allowed` (an offset in the file),
    and keeps `done` up to date for the renewals."""

    seat: Seat
    volume: Volume
    scope: str
    step: int
    patience: float  # how long a body the origin cannot resume waits for room in place
    allowed: float = 0
    done: int = 0
    resumable: bool = False
    need: int = 0  # what it parks for, told in its parked message

    def __post_init__(self) -> None:
        self.seat.amount_now = self.left

    def left(self) -> int:
        """Bytes reserved and not yet written: what the lease counts at each renewal."""
        return max(0, int(self.allowed) - self.done)

    def reserve(self, start: int, total: int | None, resumable: bool) -> None:
        """Reserve the rest of the body from `start` (a step while its size is unknown), or
        park and raise Busy; a body larger than the whole volume can hold is refused."""
        self.done, self.resumable = start, resumable
        if total is not None and total <= start:
            self.allowed = start  # nothing left to write: nothing to reserve
            return
        need = total - start if total is not None else self.step
        size = self.volume.measure()[1]
        if need > size - self.volume.margin:
            raise PermanentError(
                f"disk: the body needs {need} bytes, more than the volume can ever hold beside "
                f"DOWNLOAD_DISK_MARGIN ({size} bytes, {self.volume.margin} kept free)"
            )
        _redis_here(lambda: self._enter(need))
        self.allowed = start + need

    def more(self) -> None:
        """The body reached what is reserved: take another step, or, where none fits, park (the
        partial is kept for the run that resumes it) or, when the origin cannot resume, wait
        here up to `patience` seconds before giving up the attempt."""
        if _redis_here(self._grow):
            return
        if self.resumable:
            _redis_here(self.seat.leave)
            _redis_here(lambda: self._enter(self.step))
            self.allowed = self.done + self.step
            return
        until = time.monotonic() + self.patience
        while time.monotonic() < until:
            time.sleep(RETRY_ROOM_S)
            if _redis_here(self._grow):
                return
        raise TransientError(
            f"disk: no room on the volume for more than {self.done} bytes of a body the origin "
            f"cannot resume (waited {self.patience:g} s); it is fetched again on the next attempt"
        )

    def _grow(self) -> bool:
        if not self.seat.grow(self.left() + self.step):
            return False
        self.allowed += self.step
        return True

    def _enter(self, need: int) -> None:
        self.need = need
        self.seat.enter(self.scope, need)


T = TypeVar("T")


def _redis_here(call: Callable[[], T]) -> T:
    """Without Redis no reservation can be taken or grown: the attempt fails as a transient
    fault (the partial kept where it can be resumed), and is retried with backoff."""
    try:
        return call()
    except (redis.RedisError, OSError) as exc:
        raise TransientError(f"disk: no reservation could be taken ({exc})") from exc
