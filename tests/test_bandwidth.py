"""Bandwidth budgets in-process, against the session's private Redis: a budget spaces the bytes
taken from it at its rate whoever takes them, a download paced by two budgets waits for the
slower, a pacer sleeps what it is told and counts it, the figures operators read, and Redis away
lets the bytes flow. Rates here are slow (kilobytes a second) so that a scheduling hiccup of the
test machine is small beside the waits compared."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from download_client import records
from tasks.core import bandwidth
from tasks.core.bandwidth import Pacer
from tasks.core.ledger import Ledger
from tests.harness import free_port

DB = 9
TOLERANCE_US = 250_000
SLACK_MS = 150  # what the machine may take between two calls of a test


@pytest.fixture
def ledger(redis_server) -> Iterator[Ledger]:
    client = redis.Redis.from_url(f"{redis_server.url}/{DB}")
    client.flushdb()
    yield Ledger(client)
    client.flushdb()
    client.close()


def test_a_budget_spaces_the_bytes_taken_from_it_at_its_rate(ledger: Ledger) -> None:
    scope = [("http://slow.example:80", 10_000)]  # 10 kB/s: 10 kB is a second of it
    assert ledger.pace(scope, 2_000, TOLERANCE_US) == 0  # within the tolerance: no wait
    first = ledger.pace(scope, 10_000, TOLERANCE_US)  # booked 1.2 s ahead: wait 0.95 s
    assert 950 - SLACK_MS <= first <= 950
    # Another taker (any process, any worker) is booked after those bytes, not beside them.
    second = ledger.pace(scope, 10_000, TOLERANCE_US)
    assert 1950 - SLACK_MS <= second <= 1950
    assert 1000 - SLACK_MS <= second - first <= 1000


def test_a_download_paced_by_two_budgets_waits_for_the_slower(ledger: Ledger) -> None:
    origin, worker = ("http://slow.example:80", 10_000), ("worker w1@host", 1_000_000)
    ledger.pace([worker], 900_000, TOLERANCE_US)  # the worker's total: 0.9 s booked ahead
    wait = ledger.pace([origin, worker], 10_000, TOLERANCE_US)
    assert 750 - SLACK_MS <= wait <= 750  # the origin's 1 s, less the tolerance
    # Both budgets counted the bytes: the worker's clock moved on too.
    rates = records.bandwidth(ledger.client)
    assert rates[worker[0]]["bytes"] == 910_000 and rates[origin[0]]["bytes"] == 10_000


def test_the_pacer_sleeps_what_the_budget_says_and_counts_it(ledger: Ledger) -> None:
    pacer = Pacer(ledger, (("http://slow.example:80", 64 * 1024),))
    assert pacer.quantum == bandwidth.QUANTUM_MIN  # 20 ms of 64 KiB/s is below the minimum
    for _ in range(6):
        pacer(16 * 1024)  # 96 KiB at 64 KiB/s: 1.5 s of the rate, 0.25 s of it free
    assert 1.25 - SLACK_MS / 1000 <= pacer.held_s <= 1.25
    pacer(100)  # below a quantum: owed, not taken
    assert pacer.owed == 100
    pacer.close()  # taken without waiting: the next bytes through the budget pay for it
    assert pacer.owed == 0 and pacer.held_s <= 1.25
    assert records.bandwidth(ledger.client)["http://slow.example:80"]["bytes"] == 96 * 1024 + 100


def test_small_bodies_wait_their_turn_too(ledger: Ledger) -> None:
    """Bodies of one chunk, each below a quantum: each is taken as it arrives, with its wait."""
    scope = (("http://thumbs.example:80", 64 * 1024),)
    held = []
    for _ in range(6):  # six downloads of 16 KiB, one after the other: 0.25 s of the rate each
        pacer = Pacer(ledger, scope)
        pacer(16 * 1024)
        pacer.close()
        held.append(pacer.held_s)
    assert held[0] == 0  # within the tolerance
    assert all(0.25 - SLACK_MS / 1000 <= h <= 0.25 for h in held[2:]), held


def test_operators_read_each_budget_rate_bytes_and_whether_it_holds_back(ledger: Ledger) -> None:
    ledger.pace([("http://busy.example:80", 10_000)], 30_000, TOLERANCE_US)
    ledger.pace([("http://calm.example:80", 1_000_000)], 1_000, TOLERANCE_US)
    rates = records.bandwidth(ledger.client)
    busy, calm = rates["http://busy.example:80"], rates["http://calm.example:80"]
    assert busy["rate"] == 10_000 and busy["bytes"] == 30_000
    assert busy["ahead_s"] > records.RATE_TOLERANCE_S  # 3 s booked: holding downloads back
    assert calm["ahead_s"] <= records.RATE_TOLERANCE_S and calm["idle_s"] <= 1
    # A budget unused for a day is not shown (a removed setting, a worker gone); the figures of
    # all of them go after a week without any.
    now = int(ledger.client.time()[0])
    ledger.client.hset(records.RATES_STATS, "seen http://calm.example:80", now - 86401)
    assert set(records.bandwidth(ledger.client)) == {"http://busy.example:80"}
    assert 0 < ledger.client.pttl(records.RATES_STATS) <= 7 * 86400 * 1000


def test_with_redis_away_the_bytes_flow_and_pacing_is_tried_again_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    away = Ledger(redis.Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=1))
    pacer = Pacer(away, (("http://slow.example:80", 1024),))
    pacer(64 * 1024)  # a minute of this rate, were Redis there
    assert pacer.held_s == 0 and pacer.quiet_until > 0
    assert "bandwidth budget not applied" in caplog.text
    pacer(64 * 1024)  # quiet for QUIET_S: not even tried
    assert caplog.text.count("bandwidth budget not applied") == 1


def test_budgets_are_chosen_from_the_settings() -> None:
    origin = "http://a.example:80"
    assert bandwidth.scopes(origin, 0, "w@h", 0) == []
    assert bandwidth.scopes(origin, 5_000_000, "w@h", 0) == [(origin, 5_000_000)]
    assert bandwidth.scopes(origin, 0, "w@h", 2**20) == [("worker w@h", 2**20)]
    assert bandwidth.pacer(Ledger(None), []) is None
