"""A fleet-wide budget: a capacity per scope, shared by every worker on one Redis (no Celery here).

A budget has a kind (its name: "origin" for the per-origin slots, tasks/core/origins.py) and a
capacity for each scope (an origin, a group, a disk). A run holds a slot as a lease that one
thread per process renews every RENEW_S; a holder that dies stops renewing, and its slot comes
back when the lease ends (LEASE_MS). A run that finds no slot parks its task message in Redis
and leaves its worker process: releasing a slot (or the sweep, once a pause or a lease ends)
reserves the slot for a parked message and hands it back to be published again: first come
first served within a submitter group, and between groups by their shares of the scope's slot
time (tasks/core/ledger.py). A scope can be paused (Retry-After): nothing is granted there
until the pause ends. A budget also parks messages until a time (a retry's wait after a fault):
they sit in its due set, scored by when they are due, and the sweep hands each back to be
published when its time comes. The keys and the scripts are the ledger's (tasks/core/ledger.py).

A lease belongs to one run, not to one task id: a redelivered copy of a message that runs
beside its original (Redis put the message back while the original still ran) is another
holder, and neither can release or renew the other's slot. A run never holds a slot of one
budget while it is parked for another: it gives back what it holds before it parks.

A lease counts 1 against its scope's capacity, or, in a weighted budget, an amount (the disk
reservations count bytes against a volume's free space: tasks/core/disk.py): a parked message
then carries its `need`, and is woken only when that fits."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from download_client.groups import DEFAULT_GROUP
from tasks.core.ledger import Lease, Ledger

LEASE_MS = 10_000
WOKEN = "woken:"  # a slot kept for a woken message: `woken:<task id>` (tasks/core/ledger.py)
RENEW_S = 3.0
# A woken message not started this long after it was woken (its publisher died) is woken again.
WAKING_STALE_MS = 30_000
# A sweep hands back at most this many due messages at a time (the rest on its next pass).
DUE_BATCH = 200

log = logging.getLogger(__name__)


class Busy(Exception):
    """No slot in `scope` now: the run's message is parked and will be published again."""

    def __init__(self, kind: str, scope: str, paused_ms: int, need: int = 1) -> None:
        self.kind, self.scope, self.paused_ms, self.need = kind, scope, paused_ms, need
        why = f"paused for {paused_ms / 1000:.1f} s more" if paused_ms else "at its limit"
        super().__init__(f"{kind} {scope} is {why}; waiting for room there")


@dataclass(frozen=True)
class Budget:
    """One kind of fleet-wide limit: its name, each scope's capacity (0: no limit), the length
    of its leases, and whether the capacity is measured (free space) rather than configured."""

    kind: str
    cap_for: Callable[[str], int]
    lease_ms: int = LEASE_MS
    measured: bool = False

    def lease(
        self,
        scope: str,
        holder: str,
        task_id: str,
        group: str = DEFAULT_GROUP,
        weight: float = 1,
        amount: int = 1,
    ) -> Lease | None:
        """The lease `holder` would hold in `scope` (its time counted against `group`'s share
        there, `amount` against its capacity); None where the scope has no limit."""
        cap = self.cap_for(scope)
        if cap == 0:
            return None
        # A measured cap below 0: not measured here (another volume's), the stored one stands.
        return Lease(self.kind, scope, holder, task_id, max(cap, 1), self.lease_ms, group, weight,
                     amount, self.measured and cap > 0)  # fmt: skip

    def refreshed(self, lease: Lease) -> Lease:
        """`lease` with its cap measured now, for a release that wakes by it."""
        cap = self.cap_for(lease.scope)
        return replace(lease, cap=max(cap, 1), measured=cap > 0)

    def sweep(self, ledger: Ledger, scan: bool = False) -> list[str]:
        """Messages to publish again: woken by a pause or a lease that ended, or stuck waking
        (`scan`: also where only a keyspace scan finds them, see Ledger.sweep)."""
        return ledger.sweep(self.kind, self.cap_for, WAKING_STALE_MS, self.lease_ms, scan)

    def stats(self, ledger: Ledger) -> dict[str, Any]:
        return ledger.budget_stats(self.kind)

    def park_until(self, ledger: Ledger, message: str, seconds: float) -> None:
        """Park `message` for `seconds`; it holds nothing meanwhile, in this budget or any."""
        ledger.park_until(self.kind, message, max(0, round(seconds * 1000)))

    def due(self, ledger: Ledger, publish: Callable[[str], None]) -> int:
        """Publish the parked messages whose time has come, one by one: a message whose
        publishing fails (or whose publisher dies) is due again WAKING_STALE_MS later."""
        sent: list[str] = []
        try:
            for message in ledger.due(self.kind, WAKING_STALE_MS, DUE_BATCH):
                publish(message)
                sent.append(message)
        finally:
            ledger.published(self.kind, sent)
        return len(sent)


def holder_token(task_id: str) -> str:
    """A run's name as a lease holder: its task id and a part of its own."""
    return f"{task_id}/{uuid.uuid4().hex[:12]}"


@dataclass
class Seat:
    """What one run holds in one budget: at most one slot, in one scope at a time."""

    budget: Budget
    ledger: Ledger
    task_id: str
    parked_message: Callable[[str], str]  # the message to park, for the scope it parks at
    group: str = DEFAULT_GROUP
    weight: float = 1.0
    # The scope that keeps a slot for this run (it was woken there) until the run takes it.
    reserved: str | None = None
    holder: str = ""
    held: Lease | None = None
    woken: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.holder = self.holder or holder_token(self.task_id)

    def trying(self, scope: str) -> Lease | None:
        """The slot to try for in the run's first round trip (parking nothing), if any."""
        if self.held is not None:
            return None
        return self.budget.lease(scope, self.holder, self.task_id, self.group, self.weight)

    def granted(self, lease: Lease) -> None:
        """The slot tried for is held: keep its lease alive."""
        self.held = lease
        if lease.scope == self.reserved:
            self.reserved = None  # the slot kept for it is the one it holds
        _renewer.hold(self.ledger, lease)

    def enter(self, scope: str, amount: int = 1) -> None:
        """Hold a slot in `scope` (giving back one held elsewhere first), or park and raise Busy."""
        if self.held is not None and self.held.scope == scope:
            return
        self.leave()
        lease = self.budget.lease(scope, self.holder, self.task_id, self.group, self.weight,
                                  amount)  # fmt: skip
        if lease is None:
            return
        ok, paused_ms = self.ledger.acquire(
            lease, self.parked_message(f"{self.budget.kind} {scope}")
        )
        if not ok:
            raise Busy(self.budget.kind, scope, paused_ms, amount)
        self.granted(lease)

    def grow(self, amount: int) -> bool:
        """The held weighted lease counts `amount` from now on, if that fits (nothing parks)."""
        held = self.held
        if held is None:
            return False
        lease = replace(self.budget.refreshed(held), amount=amount)
        if not self.ledger.acquire(lease)[0]:
            return False
        _renewer.drop(held)
        self.granted(lease)
        return True

    def spare(self, scope: str) -> Lease | None:
        """One more slot in `scope` beside the one held, under a holder name of its own, if
        one is free now (nothing parks); an unlimited scope's is a lease of no budget."""
        lease = self.budget.lease(scope, holder_token(self.task_id), self.task_id, self.group,
                                  self.weight)  # fmt: skip
        if lease is None:
            return _UNLIMITED
        if not self.ledger.acquire(lease)[0]:
            return None
        _renewer.hold(self.ledger, lease)
        return lease

    def give_back(self, lease: Lease) -> list[str]:
        """A spare slot goes back now: the messages its release woke (to publish)."""
        if lease is _UNLIMITED:
            return []
        _renewer.drop(lease)
        try:
            return self.ledger.release(lease)
        except Exception as exc:  # Redis away: the lease ends on its own
            log.warning("spare %s slot not given back (%s)", self.budget.kind, exc)
            return []

    def letting_go(self) -> list[Lease]:
        """The leases to release in the run's last round trip: the slot it holds (no longer
        renewed) and the one kept for it where it was woken, if it never took that one. The
        messages the releases wake go to `woken` through `took_back`."""
        lease = self._drop_held()
        out = [lease] if lease is not None else []
        if self.reserved is not None:
            kept = self.budget.lease(self.reserved, f"{WOKEN}{self.task_id}", self.task_id)
            self.reserved = None
            out += [kept] if kept is not None else []
        return out

    def took_back(self, woken: list[str]) -> None:
        self.woken += woken

    def _drop_held(self) -> Lease | None:
        lease, self.held = self.held, None
        if lease is None:
            return None
        _renewer.drop(lease)
        if self.budget.measured:  # what its release wakes must fit what is free now
            lease = self.budget.refreshed(lease)
        return lease

    def leave(self) -> None:
        """Give the slot back now, on its own round trip (not the one kept for it elsewhere:
        a later hop may still take that one)."""
        lease = self._drop_held()
        if lease is not None:
            self.took_back(self.ledger.release(lease))

    def pause(self, seconds: float) -> None:
        """The held scope asked to slow down (429 or 503 with Retry-After): nobody in the fleet
        is granted a slot there for `seconds`."""
        if self.held is not None and seconds > 0:
            self.ledger.pause(self.held, int(seconds * 1000))


_UNLIMITED = Lease("", "", "", "", 0, 0)  # a spare "slot" where the scope has no limit


class _Renewer:
    """The one thread of a process that renews its leases every RENEW_S: a thread per download
    would cost a thread start for every small file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: dict[Lease, Ledger] = {}
        self.thread: threading.Thread | None = None

    def hold(self, ledger: Ledger, lease: Lease) -> None:
        with self.lock:
            self.leases[lease] = ledger
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="budget-leases", daemon=True)
                self.thread.start()

    def drop(self, lease: Lease) -> None:
        with self.lock:
            self.leases.pop(lease, None)

    def renew_all(self) -> None:
        with self.lock:
            held = list(self.leases.items())
        for lease, ledger in held:
            try:
                if not ledger.renew(lease):
                    log.warning("%s lease of %s in %s had ended", lease.kind, lease.holder,
                                lease.scope)  # fmt: skip
            except Exception:  # Redis away: the lease runs on; try again next time
                continue

    def _loop(self) -> None:
        while True:
            time.sleep(RENEW_S)
            self.renew_all()

    def forked(self) -> None:
        """A forked child has none of its parent's threads or downloads."""
        self.lock, self.leases, self.thread = threading.Lock(), {}, None


_renewer = _Renewer()
os.register_at_fork(after_in_child=_renewer.forked)
