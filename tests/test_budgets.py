"""The fleet-wide budget primitive in-process, against the session's private Redis: a budget
other than the origin slots ("disk", made here from the same primitive) shows its cap, ordered
wake-up, pauses, and a SIGKILLed holder's lease coming back; the origin slots are its first
instance. Deadlines are generous: what the primitive's figures are is the benchmark's business."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
import redis

from tasks.core import budgets, origins
from tasks.core.budgets import Budget, Busy, Seat
from tasks.core.ledger import BudgetKeys, Ledger
from tests.harness import ROOT, wait_for

DB = 8


@pytest.fixture
def ledger(redis_server) -> Iterator[Ledger]:
    client = redis.Redis.from_url(f"{redis_server.url}/{DB}")
    client.flushdb()
    yield Ledger(client)
    with budgets._renewer.lock:  # this process's renewer forgets the test's leases
        budgets._renewer.leases.clear()
    client.flushdb()
    client.close()


def _message(task_id: str, lane: str | None = None) -> str:
    return json.dumps({"id": task_id, "args": [], "kwargs": {}, "lane": lane})


def _seat(budget: Budget, ledger: Ledger, task_id: str, lane: str | None = None) -> Seat:
    return Seat(budget, ledger, task_id, lambda scope: _message(task_id, lane))


def _ids(messages: list[str]) -> list[str]:
    return [json.loads(m)["id"] for m in messages]


def _disk(cap: int = 2, lease_ms: int = budgets.LEASE_MS) -> Budget:
    return Budget("disk", lambda scope: cap, lease_ms)


def test_a_second_budget_holds_its_cap_and_wakes_the_parked_in_order(ledger):
    disk = _disk(cap=2)
    holders = [_seat(disk, ledger, f"h{i}") for i in range(2)]
    for seat in holders:
        seat.enter("/data")
    parked = [_seat(disk, ledger, f"p{i}") for i in range(3)]
    for seat in parked:
        with pytest.raises(Busy) as busy:
            seat.enter("/data")
        assert (busy.value.kind, busy.value.scope, busy.value.paused_ms) == ("disk", "/data", 0)
    assert disk.stats(ledger)["in_flight"] == {"/data": 2}
    holders[0].leave()
    assert _ids(holders[0].woken) == ["p0"]  # first come, first served
    holders[1].leave()
    assert _ids(holders[1].woken) == ["p1"]
    # The woken run's slot is reserved for it: a newcomer parks behind p2, p0 and p1 enter.
    with pytest.raises(Busy):
        _seat(disk, ledger, "late").enter("/data")
    parked[0].enter("/data")
    parked[1].enter("/data")
    assert disk.stats(ledger)["in_flight"] == {"/data": 2}
    parked[0].leave()
    assert _ids(parked[0].woken) == ["p2"]


def _park(budget: Budget, ledger: Ledger, task_id: str, lane: str | None = None) -> None:
    with pytest.raises(Busy):
        _seat(budget, ledger, task_id, lane).enter("/data")


def _next(budget: Budget, ledger: Ledger, holder: Seat) -> Seat:
    """The holder leaves; the one it wakes enters (its reserved slot) and holds next."""
    holder.leave()
    [woken] = _ids(holder.woken)
    seat = _seat(budget, ledger, woken)
    seat.enter("/data")
    return seat


def test_urgent_messages_parked_go_ahead_and_take_turns_with_the_others(ledger):
    disk = _disk(cap=1)
    holder = _seat(disk, ledger, "h")
    holder.enter("/data")
    for task_id, lane in [("n1", "woken"), ("n2", None), ("u1", "urgent"), ("n3", None),
                          ("u2", "urgent"), ("u3", "urgent"), ("u4", "urgent")]:  # fmt: skip
        _park(disk, ledger, task_id, lane)
    order = []
    for _ in range(7):
        holder = _next(disk, ledger, holder)
        order.append(holder.task_id)
    # Ahead of the others, one other between two urgent ones while others wait.
    assert order == ["u1", "n1", "u2", "n2", "u3", "n3", "u4"]


def test_urgent_messages_arriving_one_by_one_still_leave_the_others_every_other_turn(ledger):
    disk = _disk(cap=1)
    holder = _seat(disk, ledger, "h")
    holder.enter("/data")
    for task_id in ("n1", "n2", "n3"):
        _park(disk, ledger, task_id)
    order = []
    for i in range(6):  # a new urgent one parks before each wake: a steady flood
        _park(disk, ledger, f"u{i}", "urgent")
        holder = _next(disk, ledger, holder)
        order.append(holder.task_id)
    assert order == ["u0", "n1", "u1", "n2", "u2", "n3"]
    # With no other waiting, urgent ones follow each other; an other parked then has the next
    # turn, ahead of the urgent ones still waiting.
    holder = _next(disk, ledger, holder)
    assert holder.task_id == "u3"
    _park(disk, ledger, "n4")
    holder = _next(disk, ledger, holder)
    assert holder.task_id == "n4"
    assert _next(disk, ledger, holder).task_id == "u4"
    assert disk.stats(ledger)["in_flight"] == {"/data": 1}


def test_budgets_and_scopes_do_not_share_slots(ledger):
    disk, slots = _disk(cap=1), origins.budget(lambda origin: 1)
    _seat(disk, ledger, "a").enter("/data")
    _seat(disk, ledger, "b").enter("/other")
    _seat(slots, ledger, "c").enter("/data")  # another budget, its own scope of that name
    assert disk.stats(ledger)["in_flight"] == {"/data": 1, "/other": 1}
    assert origins.stats(ledger)["in_flight"] == {"/data": 1}


def test_a_redelivered_copy_beside_its_original_is_another_holder(ledger):
    """Redis puts a running download's message back after an outage, and the copy runs beside
    its original with the same task id: it must not ride on the original's lease, nor release
    it (the copy's release would free a slot the original still uses)."""
    disk = _disk(cap=1)
    original, copy = _seat(disk, ledger, "same"), _seat(disk, ledger, "same")
    original.enter("/data")
    with pytest.raises(Busy):
        copy.enter("/data")
    copy.leave()  # holds nothing: releases nothing
    with pytest.raises(Busy):
        _seat(disk, ledger, "other").enter("/data")
    assert disk.stats(ledger)["in_flight"] == {"/data": 1}


def test_a_run_tries_in_its_first_round_trip_without_parking(ledger):
    disk = _disk(cap=1)
    first, second = _seat(disk, ledger, "a"), _seat(disk, ledger, "b")
    lease = first.trying("/data")
    assert lease is not None
    assert ledger.acquire(lease) == (True, 0)
    first.granted(lease)
    assert first.trying("/data") is None  # held already
    other = second.trying("/data")
    assert other is not None and ledger.acquire(other) == (False, 0)
    assert disk.sweep(ledger) == []  # nothing was parked


def test_a_pause_grants_nothing_until_it_ends_and_then_the_sweep_wakes(ledger):
    disk = _disk(cap=4)
    holder = _seat(disk, ledger, "h")
    holder.enter("/data")
    holder.pause(0.5)
    with pytest.raises(Busy) as busy:
        _seat(disk, ledger, "p").enter("/data")
    assert 0 < busy.value.paused_ms <= 500
    assert disk.sweep(ledger) == []
    woken = wait_for(lambda: disk.sweep(ledger), 10, "the pause to end")
    assert _ids(woken) == ["p"]
    assert disk.stats(ledger)["counts"] == {"deferrals /data": 1, "pauses /data": 1}


def test_a_sigkilled_holders_lease_comes_back_and_wakes_the_parked(ledger, redis_server):
    """A holder in another process renews its lease until it is killed; then its lease ends
    and the sweep hands the slot to the parked run."""
    lease_ms = 1000
    holder = textwrap.dedent(
        f"""
        import sys, time, redis
        from tasks.core import budgets
        from tasks.core.budgets import Budget, Seat
        from tasks.core.ledger import Ledger
        budgets.RENEW_S = 0.2
        ledger = Ledger(redis.Redis.from_url("{redis_server.url}/{DB}"))
        seat = Seat(Budget("disk", lambda s: 1, {lease_ms}), ledger, "holder", lambda scope: "")
        seat.enter("/data")
        print("held", flush=True)
        time.sleep(600)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"held"
        disk = _disk(cap=1, lease_ms=lease_ms)
        waiter = _seat(disk, ledger, "waiter")
        with pytest.raises(Busy):
            waiter.enter("/data")
        # Renewed past several lease lengths while the holder lives.
        wait_for(lambda: _nap(3 * lease_ms / 1000), 10, "three lease lengths")
        assert disk.sweep(ledger) == []
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        woken = wait_for(lambda: disk.sweep(ledger), 10 * lease_ms / 1000, "the lease to end")
        assert _ids(woken) == ["waiter"]
        waiter.enter("/data")
        assert disk.stats(ledger)["in_flight"] == {"/data": 1}
    finally:
        proc.kill()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_a_woken_message_whose_publisher_died_is_woken_again(ledger, monkeypatch):
    monkeypatch.setattr(budgets, "WAKING_STALE_MS", 200)
    disk = _disk(cap=1)
    holder = _seat(disk, ledger, "h")
    holder.enter("/data")
    with pytest.raises(Busy):
        _seat(disk, ledger, "p").enter("/data")
    holder.leave()
    assert _ids(holder.woken) == ["p"]  # ... and its publisher dies before publishing it
    again = wait_for(lambda: disk.sweep(ledger), 10, "the woken entry to go stale")
    assert _ids(again) == ["p"]


def _nap(seconds: float) -> bool:
    import time

    time.sleep(seconds)
    return True


def test_a_waking_entry_from_before_the_json_entries_is_still_woken_again(ledger):
    """Written as '<ms>|<message>' by workers that ran before an upgrade."""
    keys = BudgetKeys("disk", "/data")
    ledger.client.hset(keys.names[3], "old", f"1000|{_message('old')}")
    assert _disk().sweep(ledger) == []  # outside the index: only a scan finds it
    assert _ids(_disk().sweep(ledger, scan=True)) == ["old"]
    assert ledger.client.smembers(keys.waking_scopes) == {b"/data"}  # indexed from then on
    assert _ids(_disk().sweep(ledger)) == []  # re-dated: not again before it goes stale


def test_the_sweep_reads_its_index_and_never_scans_the_keyspace(ledger, monkeypatch):
    """Every worker sweeps every second: a SCAN would cost it (and Redis) time in proportion to
    all the keys there are, results included."""
    monkeypatch.setattr(budgets, "WAKING_STALE_MS", 200)
    ledger.client.mset({f"celery-task-meta-{i}": "{}" for i in range(5000)})
    disk, keys = _disk(cap=1), BudgetKeys("disk", "/data")
    holder = _seat(disk, ledger, "h")
    holder.enter("/data")
    with pytest.raises(Busy):
        _seat(disk, ledger, "p").enter("/data")
    holder.leave()  # wakes p, whose publisher then dies
    assert ledger.client.smembers(keys.waking_scopes) == {b"/data"}
    scans: list[object] = []
    monkeypatch.setattr(ledger.client, "scan", lambda *a, **kw: scans.append(a) or (0, []))
    again = wait_for(lambda: disk.sweep(ledger), 10, "the woken entry to go stale")
    assert _ids(again) == ["p"] and scans == []
    _seat(disk, ledger, "p").enter("/data")  # p runs at last: the scope leaves the index
    assert ledger.client.smembers(keys.waking_scopes) == set()
    assert disk.sweep(ledger) == []


def _member(task_id: str, group: str, weight: float = 1.0) -> str:
    return json.dumps({"id": task_id, "args": [], "kwargs": {}, "group": group, "weight": weight})


def _group_seat(disk: Budget, ledger: Ledger, task_id: str, group: str, w: float = 1.0) -> Seat:
    return Seat(disk, ledger, task_id, lambda scope: _member(task_id, group, w), group, w)


def _held_for(ledger: Ledger, seat: Seat, ms: int) -> None:
    """The seat's slot as if taken `ms` ago (its slot time, without waiting it out)."""
    held = BudgetKeys("disk", "/data").names[12]
    entry = json.loads(ledger.client.hget(held, seat.holder))
    entry["at"] -= ms
    ledger.client.hset(held, seat.holder, json.dumps(entry))


def _serve(disk: Budget, ledger: Ledger, holder: Seat, weights: dict[str, float],
           hold_ms: dict[str, int], n: int) -> tuple[list[str], Seat]:  # fmt: skip
    """n turns of a slot: the holder leaves after its group's hold, the one woken enters (the
    order they entered in, and who holds the slot at the end)."""
    order = []
    for _ in range(n):
        _held_for(ledger, holder, hold_ms.get(holder.group, 0))
        holder.leave()
        [raw] = holder.woken
        m = json.loads(raw)
        holder = _group_seat(disk, ledger, m["id"], m["group"], weights.get(m["group"], 1.0))
        holder.enter("/data")
        order.append(m["id"])
    return order, holder


def test_a_group_parked_behind_another_groups_backlog_takes_turns_with_it(ledger):
    disk = _disk(cap=1)
    holder = _group_seat(disk, ledger, "h", "default")
    holder.enter("/data")
    for i in range(10):
        _park_member(disk, ledger, f"a{i}", "a")
    for i in range(3):
        _park_member(disk, ledger, f"b{i}", "b")
    order, _ = _serve(disk, ledger, holder, {}, {"a": 50, "b": 50}, 8)
    assert [x for x in order if x.startswith("b")] == ["b0", "b1", "b2"]
    assert order.index("b2") <= 6, order  # not behind a's ten: every other turn
    assert [x for x in order if x.startswith("a")] == [f"a{i}" for i in range(5)]


def test_shares_are_of_slot_time_and_follow_the_weights(ledger):
    """a (weight 3) holds its slot ten times as long as b (weight 1): over 60 turns the slot
    time goes 3:1, not the turns."""
    disk = _disk(cap=1)
    weights, hold = {"a": 3.0, "b": 1.0}, {"a": 1000, "b": 100}
    holder = _group_seat(disk, ledger, "h", "default")
    holder.enter("/data")
    for i in range(60):
        _park_member(disk, ledger, f"a{i}", "a", 3.0)
        _park_member(disk, ledger, f"b{i}", "b", 1.0)
    order, _ = _serve(disk, ledger, holder, weights, hold, 60)
    time_a = sum(hold["a"] for x in order if x.startswith("a"))
    time_b = sum(hold["b"] for x in order if x.startswith("b"))
    assert 3 * 0.85 <= time_a / time_b <= 3 * 1.15, (time_a, time_b, order)


def test_a_group_that_had_nothing_parked_joins_at_the_current_turn_without_credit(ledger):
    """b was idle while a was served 20 times: once b parks, they alternate; b's idle time is
    not owed to it (it does not take 20 turns in a row)."""
    disk = _disk(cap=1)
    holder = _group_seat(disk, ledger, "h", "default")
    holder.enter("/data")
    for i in range(40):
        _park_member(disk, ledger, f"a{i}", "a")
    _, holder = _serve(disk, ledger, holder, {}, {"a": 50, "b": 50}, 20)
    for i in range(10):
        _park_member(disk, ledger, f"b{i}", "b")
    then, _ = _serve(disk, ledger, holder, {}, {"a": 50, "b": 50}, 10)
    assert 4 <= sum(x.startswith("b") for x in then) <= 6, then


def _park_member(disk: Budget, ledger: Ledger, task_id: str, group: str, w: float = 1.0) -> None:
    with pytest.raises(Busy):
        _group_seat(disk, ledger, task_id, group, w).enter("/data")


def test_a_woken_run_that_does_not_take_the_slot_kept_for_it_gives_it_back_for_good(ledger):
    """Woken for a slot it then does not take (it parks for its group's cap, or another run has
    its destination): the slot comes back, and the message is not woken again from `waking`."""
    disk = _disk(cap=1)
    holder = _seat(disk, ledger, "h")
    holder.enter("/data")
    _park(disk, ledger, "p")
    holder.leave()
    assert _ids(holder.woken) == ["p"]
    woken = Seat(disk, ledger, "p", lambda scope: _message("p"), reserved="/data")
    for lease in woken.letting_go():
        woken.took_back(ledger.release(lease))
    _seat(disk, ledger, "n").enter("/data")  # the slot is free again
    assert ledger.sweep("disk", lambda scope: 1, 0, budgets.LEASE_MS) == []  # nothing stale
    assert woken.letting_go() == []  # given back once


def test_groups_named_like_the_ledgers_keys_are_groups_like_any_other(ledger):
    """A group called `waking`, `turn` or `held` gets a list of its own that no scan of the
    ledger's keys mistakes for a scope, and the sweep goes on."""
    disk = _disk(cap=1)
    holder = _group_seat(disk, ledger, "h", "default")
    holder.enter("/data")
    names = ("waking", "turn", "held", "slots")
    for g in names:
        _park_member(disk, ledger, f"{g}0", g)
    assert ledger.sweep("disk", lambda scope: 1, 30_000, budgets.LEASE_MS, scan=True) == []
    order, _ = _serve(disk, ledger, holder, {}, {}, len(names))
    assert sorted(order) == sorted(f"{g}0" for g in names)
