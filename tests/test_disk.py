"""Disk reservations in-process, against the session's private Redis: the budget primitive's
weighted leases (bytes against a measured capacity), a volume's name from its marker, and one
run's reservation as its body grows. Real workers on a real volume: tests/test_disk_e2e.py."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from download_client import records
from download_client.errors import PermanentError, TransientError
from tasks.core import budgets, disk
from tasks.core.budgets import Budget, Busy, Seat
from tasks.core.ledger import BudgetKeys, Ledger
from tasks.core.sweep import sweep_partials
from tests.harness import free_port, wait_for

DB = 10
VOL = "vol-test"


@pytest.fixture
def ledger(redis_db) -> Iterator[Ledger]:
    yield Ledger(redis_db(DB))
    with budgets._renewer.lock:  # this process's renewer forgets the test's leases
        budgets._renewer.leases.clear()


@dataclass
class Room:
    """A capacity the test sets, measured at each call as a volume's free space is."""

    free: int = 100

    def __call__(self, scope: str) -> int:
        return self.free


def _budget(room: Room, lease_ms: int = budgets.LEASE_MS) -> Budget:
    return Budget(disk.KIND, room, lease_ms, measured=True)


def _seat(budget: Budget, ledger: Ledger, task_id: str, need: list[int] | None = None) -> Seat:
    """A run's seat whose parked message carries the need it last asked for."""
    asked = need if need is not None else [0]
    message = lambda scope: json.dumps({"id": task_id, "need": asked[0]})  # noqa: E731
    return Seat(budget, ledger, task_id, message)


def _enter(seat: Seat, amount: int) -> None:
    want = json.loads(seat.parked_message(""))
    seat.parked_message = lambda scope: json.dumps({**want, "need": amount})
    seat.enter(VOL, amount)


def _sweep(ledger: Ledger, budget: Budget) -> list[str]:
    """The sweep as a worker on the volume runs it: the room measured first."""
    return ledger.sweep(disk.KIND, budget.cap_for, 30_000, budget.lease_ms, measured=(VOL,))


def _ids(messages: list[str]) -> list[str]:
    return [json.loads(m)["id"] for m in messages]


def _amounts(ledger: Ledger) -> dict[str, int]:
    raw = ledger.client.hgetall(BudgetKeys(disk.KIND, VOL).names[13])
    return {k.decode(): int(v) for k, v in raw.items()}


def test_leases_count_their_bytes_and_the_parked_wake_when_their_need_fits(ledger) -> None:
    room = Room(100)
    budget = _budget(room)
    a, b = _seat(budget, ledger, "a"), _seat(budget, ledger, "b")
    _enter(a, 60)
    with pytest.raises(Busy) as busy:
        _enter(b, 50)  # 60 + 50 > 100
    assert (busy.value.kind, busy.value.need) == ("disk", 50)
    # The holder writes 30 of its 60: the volume has 30 less free, its lease counts 30 less.
    room.free = 70
    assert ledger.renew(a.held, 30)  # type: ignore[arg-type]
    assert _sweep(ledger, budget) == []  # 30 + 50 > 70: still no room
    room.free = 90  # a consumer moved 20 off the volume
    assert _ids(_sweep(ledger, budget)) == ["b"]
    assert _amounts(ledger) == {a.holder: 30, "woken:b": 50}
    _enter(b, 50)  # it takes what was kept for it
    assert b.held is not None and b.held.amount == 50


def test_a_large_parked_download_is_not_overtaken_by_small_ones(ledger) -> None:
    room = Room(100)
    budget = _budget(room)
    holder = _seat(budget, ledger, "h")
    _enter(holder, 90)
    big, small = _seat(budget, ledger, "big"), _seat(budget, ledger, "small")
    for seat, need in ((big, 80), (small, 5)):
        with pytest.raises(Busy):
            _enter(seat, need)
    assert _sweep(ledger, budget) == []  # 5 would fit, but 80 is first
    holder.leave()  # its release measures the room afresh: 100 free
    assert _ids(holder.woken) == ["big", "small"]


def test_a_held_reservation_grows_only_where_the_difference_fits(ledger) -> None:
    room = Room(100)
    budget = _budget(room)
    seat, other = _seat(budget, ledger, "g"), _seat(budget, ledger, "o")
    _enter(seat, 30)
    _enter(other, 40)
    assert seat.grow(60)
    assert not seat.grow(61)  # 60 + 40 + 1 > 100, and nothing parks
    assert _amounts(ledger)[seat.holder] == 60
    assert ledger.client.llen(BudgetKeys(disk.KIND, VOL).names[2]) == 0


def test_a_dead_holders_bytes_come_back_when_its_lease_ends(ledger) -> None:
    room = Room(100)
    budget = _budget(room, lease_ms=300)
    dead, waiting = _seat(budget, ledger, "dead"), _seat(budget, ledger, "w")
    _enter(dead, 90)
    with budgets._renewer.lock:
        budgets._renewer.leases.clear()  # its process died: nobody renews it
    with pytest.raises(Busy):
        _enter(waiting, 50)
    woken = wait_for(lambda: _sweep(ledger, budget), 10, "the lease to end")
    assert _ids(woken) == ["w"]
    assert dead.holder not in _amounts(ledger)  # the sweep forgot what the dead held


def test_a_run_woken_for_less_than_it_now_needs_waits_again_first_in_line(ledger) -> None:
    room = Room(60)
    budget = _budget(room)
    holder, late = _seat(budget, ledger, "h"), _seat(budget, ledger, "late")
    _enter(holder, 60)
    for seat, need in ((late, 40), (_seat(budget, ledger, "next"), 30)):
        with pytest.raises(Busy):
            _enter(seat, need)
    holder.leave()
    assert _ids(holder.woken) == ["late"]  # 40 + 30 > 60: the next one waits on
    late.reserved = VOL
    with pytest.raises(Busy):  # the body grew to 80 since: more than there is room for
        _enter(late, 80)
    parked = ledger.client.lrange(BudgetKeys(disk.KIND, VOL).names[2], 0, -1)
    assert _ids([m.decode() for m in parked]) == ["late", "next"]  # its turn had come


@dataclass(frozen=True)
class FakeVolume(disk.Volume):
    """A volume whose free space the test sets (the real one is measured in the e2e tests)."""

    sizes: dict[str, int] = field(default_factory=lambda: {"free": 100, "size": 200})

    def measure(self) -> tuple[int, int]:
        return self.sizes["free"], self.sizes["size"]


def test_the_sweep_measures_the_volume_and_operators_read_it(ledger, tmp_path: Path) -> None:
    volume = FakeVolume(tmp_path, margin=10)
    name = disk.volume_of(tmp_path)
    seat = Seat(volume.budget(), ledger, "r", lambda scope: json.dumps({"id": "p", "need": 50}))
    seat.enter(name, 60)
    parked = Seat(volume.budget(), ledger, "p", lambda scope: json.dumps({"id": "p", "need": 50}))
    with pytest.raises(Busy):
        parked.enter(name, 50)  # 60 + 50 > 100 - 10
    assert volume.sweep(ledger) == []
    shown = records.disks(ledger.client)[name]
    assert (shown["reserved"], shown["holders"], shown["waiting"]) == (60, 1, 1)
    assert (shown["free"], shown["margin"], shown["path"]) == (100, 10, str(tmp_path))
    volume.sizes["free"] = 150  # a consumer moved a file off: the sweep wakes the parked one
    assert _ids(volume.sweep(ledger)) == ["p"]


def test_a_worker_measures_its_own_volume_only(ledger, tmp_path: Path) -> None:
    """A message woken for room on volume B can run on a worker whose directory is on A: what
    it gives back there is released by B's stored room, never by A's free space."""
    a = FakeVolume(tmp_path / "a", margin=10, sizes={"free": 1000, "size": 2000})
    b = FakeVolume(tmp_path / "b", margin=10, sizes={"free": 100, "size": 2000})
    on_b = disk.volume_of(b.root)
    assert a.room(on_b) == disk.UNMEASURED and b.room(on_b) == 90
    holder = Seat(b.budget(), ledger, "h", lambda scope: json.dumps({"id": "h", "need": 60}))
    holder.enter(on_b, 60)
    woken = Seat(a.budget(), ledger, "p", lambda scope: json.dumps({"id": "p", "need": 50}))
    with pytest.raises(Busy):
        Seat(b.budget(), ledger, "p", woken.parked_message).enter(on_b, 50)
    holder.leave()
    assert _ids(holder.woken) == ["p"]
    woken.reserved = on_b  # it runs on A, and parks elsewhere: the room kept for it goes back
    for lease in woken.letting_go():
        ledger.release(lease)
    assert int(ledger.client.get(BudgetKeys(disk.KIND, on_b).names[4])) == 90
    assert a.sweep(ledger) == []  # A's sweep leaves B alone


def test_a_volume_is_named_by_its_marker_which_the_sweep_keeps(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    names: list[str] = []
    makers = [threading.Thread(target=lambda: names.append(disk._make_marker(_area(a))))
              for _ in range(8)]  # fmt: skip
    for t in makers:
        t.start()
    for t in makers:
        t.join()
    assert len(set(names)) == 1  # racing workers agree on one name
    assert disk.volume_of(a) == names[0] != disk.volume_of(b)
    sweep_partials(a, max_age=0, now=2**40)
    assert (_area(a)).read_text().strip() == names[0]


def _area(root: Path) -> Path:
    (root / ".partial").mkdir(parents=True, exist_ok=True)
    return root / ".partial" / disk.MARKER


def _space(ledger: Ledger, volume: FakeVolume, patience: float = 0.2) -> disk.Space:
    box: list[disk.Space] = []
    message = lambda scope: json.dumps({"id": "s", "need": box[0].need})  # noqa: E731
    seat = Seat(volume.budget(), ledger, "s", message)
    name = disk.volume_of(volume.root)
    box.append(disk.Space(seat, volume, name, step=10, patience=patience))
    return box[0]


def test_a_body_reserves_what_it_needs_and_grows_a_step_at_a_time(ledger, tmp_path) -> None:
    volume = FakeVolume(tmp_path, margin=10, sizes={"free": 100, "size": 200})
    space = _space(ledger, volume)
    with pytest.raises(PermanentError, match="more than the volume can ever hold"):
        space.reserve(0, 191, resumable=True)  # 200 - 10 is all it could ever have
    space.reserve(5, None, resumable=True)  # unknown size: a step
    assert (space.allowed, space.need) == (15, 10)
    space.done = 15
    volume.sizes["free"] = 90  # what it wrote is gone from the free space
    space.more()
    assert space.allowed == 25
    space.done, volume.sizes["free"] = 25, 15  # someone else filled the volume
    with pytest.raises(Busy) as busy:
        space.more()  # resumable: it parks for a step, its partial kept
    assert busy.value.need == 10 and space.seat.held is None


def test_a_body_that_cannot_resume_waits_in_place_then_gives_the_attempt_up(
    ledger, tmp_path
) -> None:
    volume = FakeVolume(tmp_path, margin=10, sizes={"free": 30, "size": 200})
    space = _space(ledger, volume, patience=0.6)
    space.reserve(0, None, resumable=False)
    space.done = 10
    volume.sizes["free"] = 15  # 5 to reserve: not a step
    timer = threading.Timer(0.2, lambda: volume.sizes.update(free=40))
    timer.start()  # room appears while it waits
    space.more()
    assert space.allowed == 20
    space.done, volume.sizes["free"] = 20, 10
    with pytest.raises(TransientError, match="cannot resume"):
        space.more()


def test_without_redis_a_body_goes_on_by_the_volumes_own_free_space(tmp_path) -> None:
    away = Ledger(redis.Redis("127.0.0.1", free_port(), retry=Retry(NoBackoff(), 0)))
    volume = FakeVolume(tmp_path, margin=10, sizes={"free": 100, "size": 200})
    space = _space(away, volume)
    space.reserve(0, 50, resumable=True)  # 50 fits in 100 - 10: it goes on, unreserved
    assert space.allowed == 50 and space.seat.held is None
    space.done = 50
    space.check(60)  # a step more, where the free space holds it
    assert space.allowed == 60
    volume.sizes["free"] = 15
    with pytest.raises(TransientError, match="no reservation could be taken"):
        space.check(75)  # no room, and it cannot wait parked without Redis
    with pytest.raises(TransientError, match="has not 95 bytes free beyond DOWNLOAD_DISK_MARGIN"):
        _space(away, volume).reserve(0, 95, resumable=True)
    away.client.close()


def test_a_chunk_larger_than_a_step_takes_steps_enough_and_a_lost_lease_stops_the_body(
    ledger, tmp_path
) -> None:
    volume = FakeVolume(tmp_path, margin=0, sizes={"free": 100 * disk.REPORT_BYTES, "size": 2**40})
    space = _space(ledger, volume)
    space.reserve(0, None, resumable=True)  # a step of 10 bytes
    space.check(35)  # one chunk of 35 bytes: four steps before it is written
    assert space.allowed == 40
    # Its lease ends while Redis cannot be reached (the sweep dropped it): the next report
    # finds it gone, and the attempt stops rather than write without a reservation.
    space.seat.leave()
    space.reserve(0, 2 * disk.REPORT_BYTES, resumable=True)
    ledger.client.delete(BudgetKeys(disk.KIND, space.scope).names[0])
    space.done = disk.REPORT_BYTES + 35
    with pytest.raises(TransientError, match="the reservation was lost"):
        space.check(space.done + 1)
