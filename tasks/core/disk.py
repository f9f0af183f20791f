"""Disk reservations, fleet-wide: a weighted budget (tasks/core/budgets.py) whose scopes are
volumes and whose leases count bytes (no Celery here).

A volume is what one DOWNLOAD_DIR lives on, named by a marker file in its in-progress area
(`.partial/volume`, made by the first worker to use it): workers that share the directory (a
network file system) share the name, whatever their hosts call its device. Its capacity is
measured, never configured: the space free for unprivileged writers, less DOWNLOAD_DISK_MARGIN.

A lease counts the bytes its download has reserved and not yet written: what it wrote is
already gone from the free space, so counting it again would leave room unused. The download
tells its lease what is left each time it has written REPORT_BYTES and when it grows; between
two reports the lease counts more than is left, never less. Only workers on a volume measure
it: one that gives back room kept on another volume leaves that volume's stored capacity as
it is.

A download reserves what its body still needs once the headers say (Content-Length, less what
a partial already holds), or DOWNLOAD_DISK_STEP at a time while the size is unknown, and never
writes past what it holds. One that does not fit parks its message like a download waiting for
an origin slot: it holds no worker process and no origin slot meanwhile, and the partial it
has stays. A release, or the sweep once a second (a consumer may free space any time), wakes
the parked downloads whose need fits, in their turn."""

from __future__ import annotations

import json
import logging
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
from tasks.core.budgets import LEASE_MS, WAKING_STALE_MS, Budget, Seat
from tasks.core.ledger import Ledger

KIND = "disk"
MARKER = "volume"  # in `.partial/`: the sweep of the in-progress area leaves it alone
# How often a download that cannot grow, and whose origin cannot resume, looks for room again.
RETRY_ROOM_S = 0.5
# A running download tells its lease what is left of its reservation each time it has written
# this much (and when it grows).
REPORT_BYTES = 8 * 2**20
UNMEASURED = -1  # a capacity not measured here (tasks/core/budgets.py: Budget.lease)

log = logging.getLogger(__name__)
_REDIS_ERRORS = (redis.RedisError, OSError)

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
        """(bytes free for unprivileged writers, the most they could ever have: the file
        system's size less the blocks kept for root)."""
        st = os.statvfs(self.root / PARTIAL_DIR)
        kept = st.f_bfree - st.f_bavail
        return st.f_bavail * st.f_frsize, (st.f_blocks - kept) * st.f_frsize

    def room(self, scope: str = "") -> int:
        """The capacity of the volume's budget: free space less the margin (at least 1: a
        capacity of 0 would mean no limit). UNMEASURED for another volume, or where this one
        cannot be measured: the capacity its own workers stored last stands."""
        if scope and scope != volume_of(self.root):
            return UNMEASURED
        try:
            return max(1, self.measure()[0] - self.margin)
        except OSError:
            return UNMEASURED

    def budget(self) -> Budget:
        return Budget(KIND, self.room, measured=True)

    def sweep(self, ledger: Ledger) -> list[str]:
        """The volume measured now, noted for `downloads status` and the metrics, and the parked
        downloads that fit in it woken (space freed by a consumer wakes nobody else). Each
        volume is swept by the workers on it: others cannot measure it."""
        name = volume_of(self.root)
        free, size = self.measure()
        seen = {"path": str(self.root), "host": socket.gethostname(), "free": free,
                "size": size, "margin": self.margin, "at": round(time.time(), 3)}  # fmt: skip
        ledger.client.hset(DISK_VOLUMES, name, json.dumps(seen))
        room = max(1, free - self.margin)
        return ledger.sweep(KIND, lambda scope: room, WAKING_STALE_MS, LEASE_MS, measured=(name,),
                            only=(name,))  # fmt: skip


@dataclass
class Space:
    """One run's reservation on its volume. `reserve` takes what the body needs before it is
    read; the body then calls `check` with the offset a chunk would reach before it writes it,
    whenever that passes `check_at`, and keeps `done` (the bytes in the file) up to date."""

    seat: Seat
    volume: Volume
    scope: str
    step: int
    patience: float  # how long a body the origin cannot resume waits for room in place
    allowed: int = 0  # the offset the reservation reaches
    done: int = 0
    check_at: int = 0
    reported: int = 0  # `done` when the lease was last told what is left of it
    resumable: bool = False
    need: int = 0  # what it parks for, told in its parked message

    def left(self) -> int:
        """Bytes reserved and not yet written: what the lease counts."""
        return max(0, self.allowed - self.done)

    def reserve(self, start: int, total: int | None, resumable: bool) -> None:
        """Reserve the rest of the body from `start` (a step while its size is unknown), or
        park and raise Busy; a body larger than the volume could ever hold is refused."""
        self.done = self.reported = self.allowed = self.check_at = start
        self.resumable = resumable
        if total is not None and total <= start:
            return  # nothing left to write: nothing to reserve
        need = total - start if total is not None else self.step
        most = _transient(self.volume.measure)[1] - self.volume.margin
        if need > most:
            raise PermanentError(
                f"disk: the body needs {need} bytes, more than the volume can ever hold beside "
                f"DOWNLOAD_DISK_MARGIN ({most} bytes)"
            )
        try:
            self._enter(need)
        except _REDIS_ERRORS as exc:
            self._unreserved(need, exc)
        self.allowed = start + need
        self._next_check()

    def check(self, upto: int) -> None:
        """Before the body reaches `upto`: more room where it has not, and now and then the
        lease told what is left of the reservation (what was written is gone from the free
        space: counted twice, it would keep others waiting for room that is not used)."""
        while upto > self.allowed:
            self.more()
        if self.done - self.reported >= REPORT_BYTES:
            self._report()
        self._next_check()

    def more(self) -> None:
        """The body reached what is reserved: take another step, or, where none fits, park (the
        partial is kept for the run that resumes it) or, when the origin cannot resume, wait
        here up to `patience` seconds before giving up the attempt."""
        if _transient(self._grow):
            return
        if self.resumable:
            _transient(self.seat.leave)
            _transient(lambda: self._enter(self.step))
            self.allowed, self.reported = self.done + self.step, self.done
            return
        until = time.monotonic() + self.patience
        while time.monotonic() < until:
            time.sleep(RETRY_ROOM_S)
            if _transient(self._grow):
                return
        raise TransientError(
            f"disk: no room on the volume for more than {self.done} bytes of a body the origin "
            f"cannot resume (waited {self.patience:g} s); it is fetched again on the next attempt"
        )

    def _grow(self) -> bool:
        """One step more: on the lease it holds, or, going on without one (Redis was away), by
        the volume's own free space."""
        if self.seat.held is None:
            grown = self._room_for(self.step)
        else:
            try:
                grown = self.seat.grow(self.allowed + self.step - self.done)
            except _REDIS_ERRORS:
                grown = self._room_for(self.step)
        if grown:
            self.allowed, self.reported = self.allowed + self.step, self.done
        return grown

    def _unreserved(self, need: int, exc: Exception) -> None:
        """Redis away: the body goes on where the volume's own free space, less the margin,
        holds it (and each step after it), as bytes flow unpaced when the bandwidth budgets
        cannot be reached. The room is a courtesy among downloads, not a reason to fail one;
        but without Redis nothing can wait parked for it."""
        log.warning("disk reservation not taken (%s); going on by the volume's free space", exc)
        if not self._room_for(need):
            raise TransientError(
                f"disk: no reservation could be taken ({exc}), and the volume has not {need} "
                "bytes free beyond DOWNLOAD_DISK_MARGIN; the attempt is retried"
            ) from exc

    def _room_for(self, n: int) -> bool:
        """The volume's own free space, less the margin, holds `n` more bytes."""
        return n <= _transient(self.volume.room)

    def _report(self) -> None:
        held, self.reported = self.seat.held, self.done
        if held is None:
            return  # going on without a reservation (Redis was away): nothing to tell
        try:
            kept = self.seat.ledger.renew(held, self.left())
        except _REDIS_ERRORS:
            return  # Redis away: the renewals keep the lease; the next report tells
        if not kept:
            raise TransientError(
                "disk: the reservation was lost (its lease ended while Redis could not be "
                "reached); the attempt is retried"
            )

    def _next_check(self) -> None:
        self.check_at = min(self.allowed, self.reported + REPORT_BYTES)

    def _enter(self, need: int) -> None:
        self.need = need
        self.seat.enter(self.scope, need)


T = TypeVar("T")


def _transient(call: Callable[[], T]) -> T:
    """Without Redis (or the volume) no reservation can be taken or grown: the attempt fails as
    a transient fault (the partial kept where it can be resumed), and is retried with backoff."""
    try:
        return call()
    except _REDIS_ERRORS as exc:
        raise TransientError(f"disk: no reservation could be taken ({exc})") from exc
