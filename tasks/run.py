"""One run of a download as the fleet sees it: what it holds in Redis (the destination's claim, a
slot at its origin, its delivery count) from admission to settling, through the ledger
(tasks/core/ledger.py), and the one backend interface those writes ride on (`LedgerBackend`)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from celery import Task, states

from download_client.arguments import Deadline, DownloadRequest, utc_text
from download_client.contract import WAITING
from download_client.errors import PermanentError
from download_client.settings import Settings
from tasks import counters, deliveries, messages, parking, waiting
from tasks.core import bandwidth, claims, disk, group_slots, origins
from tasks.core.budgets import Busy, Seat
from tasks.core.ledger import Admit, Admitted, Lease, Ledger, Settle, Settled, State
from tasks.deliveries import REDIS_ERRORS
from tasks.retries import Journey

log = logging.getLogger(__name__)


class LedgerBackend(Protocol):
    """What the task needs of its result backend (worker/backend.py is the one there is): the
    ledger on its Redis, a state encoded as the backend stores it, and writes that ride with the
    task's final state in its round trip (`then` gets what they settled)."""

    ledger: Ledger

    def state(self, task_id: str, result: Any, state: str, request: Any) -> State: ...

    def ride(self, task_id: str, settle: Settle, then: Callable[[Settled], None]) -> None: ...


def backend_of(task: Task) -> LedgerBackend:
    backend = task.backend
    kind = type(backend)
    # The protocol's members, looked up once per backend class: an isinstance() against a
    # runtime-checkable Protocol walks them again on every call, for every download.
    if kind not in _LEDGER_BACKENDS:
        if not all(hasattr(backend, name) for name in ("ledger", "state", "ride")):
            raise TypeError(f"{kind.__name__} is not a ledger backend (a Redis is needed)")
        _LEDGER_BACKENDS.add(kind)
    return cast(LedgerBackend, backend)


_LEDGER_BACKENDS: set[type] = set()


class Run:
    """A run's claim, slot and count: `admit` takes them in one round trip, and `succeed`,
    `step_aside`, `park` or `let_go` gives them back in one more."""

    def __init__(self, task: Task, s: Settings, request: DownloadRequest) -> None:
        self.task, self.settings, self.request = task, s, request
        self.backend = backend_of(task)
        self.ledger = self.backend.ledger
        self.journey = Journey.of(task)
        # A run after a wait leaves WAITING stored until it really runs (`running`), so a run
        # that only waits again is never shown as started (nor sent as started: messages.py).
        self.after_wait = messages.waited(task.request.headers or {})
        self.ran = False
        # The holder may run up to its hard time limit, then wait up to the longest countdown.
        ttl = s.time_limit + s.retry_backoff_max + 60
        self.claim = claims.claim(request, task.request.id, ttl, self.journey.waiting_for)
        self.given_deadline = request.deadline or (Deadline(seconds=s.deadline) if s.deadline
                                                   else None)  # fmt: skip
        self.deadline: float | None = None  # epoch seconds, once admitted
        message = lambda scope: parking.message(task, scope=scope)  # noqa: E731
        weight = s.group_weight(request.group)
        # Woken for a slot: the budget and scope that keep it for this run.
        woken_for = str((task.request.headers or {}).get(parking.WOKEN_FOR) or "")
        kind, _, kept = woken_for.partition(" ")
        self.seat: Seat | None = None  # at each hop's origin
        if s.host_concurrency or s.host_limits:
            reserved = kept if kind == origins.KIND else None
            self.seat = Seat(origins.budget(s.host_limit), self.ledger, task.request.id, message,
                             request.group, weight, reserved)  # fmt: skip
        # Of a capped group: taken first, given back right after parking for an origin slot.
        self.group_seat: Seat | None = None
        if s.group_limit(request.group):
            reserved = kept if kind == group_slots.KIND else None
            self.group_seat = Seat(group_slots.budget(s.group_limit), self.ledger,
                                   task.request.id, message, request.group, weight,
                                   reserved)  # fmt: skip
        # Room on the volume, reserved once the headers tell the body's size.
        self.space: disk.Space | None = None
        if s.disk_margin is not None:
            self.space = self._space(s, kept if kind == disk.KIND else None, request.group, weight)

    def _space(self, s: Settings, reserved: str | None, group: str, weight: float) -> disk.Space:
        volume = disk.Volume(s.download_dir, s.disk_margin or 0)
        task = self.task

        def message(scope: str) -> str:
            return parking.message(task, scope=scope, need=space.need)

        seat = Seat(volume.budget(), self.ledger, task.request.id, message, group, weight,
                    reserved)  # fmt: skip
        space = disk.Space(seat, volume, disk.volume_of(s.download_dir), s.disk_step,
                           s.read_timeout)  # fmt: skip
        return space

    def admit(self) -> Admitted:
        """Take the destination's claim, count this delivery (the poison guard), store STARTED
        (unless the download waited before: then `running` says when it runs) and try for a slot
        at the origin: one round trip."""
        req = self.task.request
        meta = {"pid": os.getpid(), "hostname": req.hostname}
        started = self.backend.state(req.id, meta, states.STARTED, req)
        lease = self._first_try()
        stored = None if self.after_wait else started
        now = time.time()
        end = self.given_deadline.end(now) if self.given_deadline is not None else None
        ask = Admit(req.id, req.retries, self.settings.result_expires, started.key, self.claim,
                    stored, lease, end)  # fmt: skip
        try:
            admitted = self.ledger.admit(ask)
        except REDIS_ERRORS as exc:
            # Redis away: the destination's lock alone keeps writers apart on this file system.
            log.warning("destination claim and delivery count not taken (%s)", exc)
            self.deadline = end
            return Admitted(None, 0, req.retries + 1, False, end)
        self.deadline = admitted.deadline
        seat = self.group_seat or self.seat  # the one `lease` is of
        if admitted.granted and lease is not None and seat is not None:
            seat.granted(lease)
        try:
            deliveries.check(admitted.delivered, self.settings.max_deliveries)
            if admitted.deadline_fixed_now and end is not None and end <= now:
                raise PermanentError(f"deadline: {utc_text(end)} had passed when a worker "
                                     "took the download")  # fmt: skip
        except PermanentError:  # a poison message, or too late: its waiters must not wait for it
            self.let_go(claim=True)
            raise
        return admitted

    def last_attempt(self, now: float) -> bool:
        """This attempt is the last one: the deadline has come, or (without one) the transient
        faults so far have spent DOWNLOAD_MAX_RETRIES."""
        if self.deadline is not None:
            return now >= self.deadline
        return self.journey.faults >= self.settings.max_retries

    def park_retry(self, journey: Journey, delay: float) -> None:
        """The next attempt waits in Redis until it is due (the budget's due set, woken by the
        sweep), holding no worker process and no worker memory; raises a Redis error if it
        cannot be parked."""
        message = parking.message(self.task, journey.headers(self.task), retry=True)
        origins.budget(self.settings.host_limit).park_until(self.ledger, message, delay)

    def _first_try(self) -> Lease | None:
        """The slot tried for in the admission's round trip: the group's when it is capped (it
        comes first), else the first origin's."""
        if self.group_seat is not None:
            return self.group_seat.trying(self.request.group)
        if self.seat is not None:
            return self.seat.trying(origins.origin_of(self.request.url))
        return None

    @property
    def gated(self) -> bool:
        return self.seat is not None or self.group_seat is not None

    def gate(self) -> Callable[[str], None] | None:
        """What each hop passes before its request: its group's slot (a capped group's, first),
        a slot at the hop's origin (or Busy), and then the run really runs."""
        if not self.gated:
            return None
        seat, group = self.seat, self.group_seat

        def enter(url: str) -> None:
            if group is not None:
                group.enter(self.request.group)
            if seat is not None:
                seat.enter(origins.origin_of(url))
            self.running()

        return enter

    def pacing(self) -> Callable[[str], bandwidth.Pacer | None] | None:
        """The bandwidth budgets of the URL a body comes from (its origin's, this worker's
        total), or None where there are none at all."""
        s = self.settings
        if not (s.host_rate or s.host_rates or s.worker_rate):
            return None
        worker = str(self.task.request.hostname or "unknown")

        def budgets(url: str) -> bandwidth.Pacer | None:
            origin = origins.origin_of(url)
            found = bandwidth.scopes(origin, s.rate_limit(origin), worker, s.worker_rate)
            return bandwidth.pacer(self.ledger, found)

        return budgets

    def spare(self) -> Callable[[str], Callable[[], None] | None] | None:
        """A segmented download's connections beyond the first: each takes a slot at its URL's
        origin if one is free right now (never waiting, never parking), or is not opened."""
        seat = self.seat
        if seat is None:
            return None

        def take(url: str) -> Callable[[], None] | None:
            try:
                lease = seat.spare(origins.origin_of(url))
            except REDIS_ERRORS:
                return None  # the fleet's count cannot be read: no more than the one slot
            if lease is None:
                return None
            return lambda: self._publish_now(seat.give_back(lease))

        return take

    def _publish_now(self, woken: list[str]) -> None:
        """Publish what a slot given back mid-run woke (a slot is kept for each until then);
        what cannot be published now goes with the run's last round trip."""
        for i, raw in enumerate(woken):
            try:
                parking.publish_one(self.task.app, raw)
            except Exception as exc:
                log.warning("woken downloads not published yet (%s)", exc)
                if self.seat is not None:
                    self.seat.took_back(woken[i:])
                return

    def running(self) -> None:
        """The run's first request is about to go out: after a wait, say so, once
        (tasks/waiting.py). A first run's STARTED (stored at admission, and the main process's
        event) says it already, at no extra round trip."""
        if self.after_wait and not self.ran:
            self.ran = True
            waiting.running(self.task)

    def pause_origin(self, seconds: float) -> None:
        if self.seat is not None:
            self.seat.pause(seconds)

    def succeed(self, result: Any) -> None:
        """Leave the result to the destination's waiters, give the slot back and count the bytes:
        with SUCCESS, in its round trip."""
        n = counters.received_bytes(result)
        settle = Settle(
            claim=self.claim,
            left=dict(result),
            release=self._letting_go(),
            bytes_for=(str(result.get("worker") or "unknown"), n) if n > 0 else None,
        )
        self.backend.ride(self.task.request.id, settle, self._woke)

    def step_aside(self) -> None:
        """This run does not download (another task has the destination): its count and any slot
        it took go back."""
        self._settle(Settle(release=self._letting_go(), uncount=self._this_delivery()))

    def park(self, busy: Busy) -> None:
        """The message waits in Redis for a slot: this run is not counted, and it gives back in
        the same round trip what it holds (a group's slot, and the slot its origin kept for it
        if it was woken there and parks for its group instead); WAITING is stored with them."""
        req = self.task.request
        release = self._letting_go()
        if busy.kind == group_slots.KIND:
            meta = waiting.for_group(busy.scope)
        elif busy.kind == disk.KIND:
            meta = waiting.for_disk(busy.scope, busy.need)
        else:
            meta = waiting.for_origin(busy.scope)
        final = self.backend.state(req.id, meta, WAITING, req)
        self._settle(Settle(final=final, release=release, uncount=self._this_delivery()))
        waiting.announce(self.task, meta)

    def wait(self, dest: str) -> None:
        """The run ends waiting for a busy destination (its message is sent again with a
        countdown): WAITING, stored and announced."""
        meta = waiting.for_destination(dest)
        req = self.task.request
        try:
            self.ledger.store_state(self.backend.state(req.id, meta, WAITING, req))
        except REDIS_ERRORS as exc:
            log.warning("waiting not stored (%s); the download waits all the same", exc)
        waiting.announce(self.task, meta)

    def let_go(self, claim: bool) -> None:
        """The run ends without a result: the slot goes back, and the claim too when `claim`."""
        self._settle(Settle(claim=self.claim if claim else None, release=self._letting_go()))

    @property
    def _seats(self) -> tuple[Seat, ...]:
        space = self.space.seat if self.space is not None else None
        return tuple(seat for seat in (self.seat, self.group_seat, space) if seat is not None)

    def _letting_go(self) -> tuple[Lease, ...]:
        return tuple(lease for seat in self._seats for lease in seat.letting_go())

    def _this_delivery(self) -> tuple[str, int]:
        return self.task.request.id, self.task.request.retries

    def _settle(self, settle: Settle) -> None:
        try:
            settled = self.ledger.settle(settle) if settle != Settle() else Settled(False)
        except REDIS_ERRORS as exc:
            log.warning("slot and claim not given back (%s); their leases end on their own", exc)
            settled = Settled(False)
        self._woke(settled)

    def _woke(self, settled: Settled) -> None:
        """Publish the parked messages this run's releases woke."""
        woken = settled.woken
        for seat in self._seats:
            woken, seat.woken = [*seat.woken, *woken], []
        if woken:
            parking.publish(self.task.app, woken)
