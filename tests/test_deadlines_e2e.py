"""End to end: downloads with a deadline against real workers, scaled down (a backoff capped at
5 s, outages of tens of seconds). An origin "down" is a port nothing listens on (connections are
refused); it comes back as a loopback origin started on the same port."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from datetime import UTC
from typing import Any

import pytest
import redis
from celery import Celery
from celery.result import AsyncResult

from download_client.lanes import woken_lane
from tests import crowd
from tests.conftest import failure, kill_each_delivery, submit
from tests.harness import RedisServer, Worker, free_port, wait_for, worker_env
from tests.server import OriginServer, body_sha256

CAP_S = 5.0
SETTINGS = {
    "DOWNLOAD_RETRY_BACKOFF": "1",
    "DOWNLOAD_RETRY_BACKOFF_MAX": f"{CAP_S:g}",
    # Waits over 1 s are parked in Redis; shorter ones are countdowns: both kinds happen.
    "DOWNLOAD_PARK_AFTER": "1",
}
DUE = "downloads:origins:due"
DUE_TIME = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"


@pytest.fixture(scope="module")
def patient(start_worker) -> Worker:
    """A worker retrying 3 times (the harness's default) with backoff from 1 s capped at 5 s."""
    return start_worker(**SETTINGS)


def _note(client, task_id: str) -> dict[str, Any] | None:
    raw = client.backend.client.get(f"downloads:retry:{task_id}")
    return json.loads(raw) if raw else None


def _failed_attempts(client, task_id: str) -> int:
    note = _note(client, task_id)
    return int(note["attempt"]) if note else 0


def _parked(client, task_id: str) -> bool:
    """The download's next attempt waits in the due set in Redis (no worker holds it)."""
    return any(json.loads(m)["id"] == task_id for m in client.backend.client.zrange(DUE, 0, -1))


def _held(client, worker: Worker, task_id: str) -> bool:
    """A message of the download is queued or held by a worker (kombu's unacked records)."""
    port = client.backend.client.connection_pool.connection_kwargs["port"]
    broker = redis.Redis(port=port, db=0)
    try:
        queued = [
            *broker.lrange(worker.queue, 0, -1),
            *broker.lrange(woken_lane(worker.queue), 0, -1),
            *broker.hvals("unacked"),
        ]
        return any(task_id.encode() in m for m in queued)
    finally:
        broker.close()


def _refused_url(key: str) -> tuple[int, str]:
    port = free_port()  # nothing listens there until the test starts an origin on it
    return port, f"http://127.0.0.1:{port}/bytes/5000?seed={key}&key={key}"


def test_an_outage_past_the_attempt_budget_ends_in_success_before_the_deadline(
    client, patient, key
):
    port, url = _refused_url(key)
    with_deadline = submit(client, patient, url=url, dest=f"deadline/{key}.bin", deadline=120)
    without = submit(client, patient, url=url, dest=f"deadline/{key}-without.bin")

    # Without a deadline, as before: 1 + DOWNLOAD_MAX_RETRIES attempts, then FAILURE.
    with pytest.raises(Exception) as info:
        without.get(timeout=60)
    said = rf"connection refused by 127\.0\.0\.1:{port}, 4 attempts over [0-9.]+ s"
    assert re.fullmatch(said, str(info.value)), str(info.value)

    # With one: retried past that budget, its RETRY and its note saying when the next attempt
    # is due and when the deadline ends, its longer waits parked in Redis.
    def retrying_past_the_budget() -> bool:
        return with_deadline.state == "RETRY" and _failed_attempts(client, with_deadline.id) >= 6

    wait_for(retrying_past_the_budget, 90, "attempts past the attempt budget")
    task_id = with_deadline.id
    parked = lambda: _parked(client, task_id) and not _held(client, patient, task_id)  # noqa: E731
    wait_for(parked, 30, "a wait parked in Redis, its message held by no worker")
    note = _note(client, with_deadline.id)
    assert note is not None and note["due"] <= note["deadline"]
    reason = rf"connection refused by 127\.0\.0\.1:{port}"
    shown = rf"{reason}; next attempt due {DUE_TIME}, deadline {DUE_TIME}"
    wait_for(lambda: re.fullmatch(shown, str(with_deadline.info)), 30, "RETRY's info")

    origin = OriginServer(port=port).start()
    try:
        result = with_deadline.get(timeout=90)
    finally:
        origin.stop()
    assert result["attempts"] >= 7 and result["retried_s"] > 0
    assert result["deadline"] == note["deadline"] and result["waited_s"] == 0
    assert result["sha256"] == body_sha256(5000, key)
    assert len(origin.stats.for_key(key)) == 1


def test_an_attempt_due_after_a_wait_goes_ahead_of_the_downloads_queued_meanwhile(
    client, start_worker, origin, key
):
    due_ahead_of_a_backlog(client, start_worker(concurrency=1, **AHEAD), origin, key)


def test_workers_restarted_during_the_outage_lose_nothing_and_transfer_once(
    client, start_worker, key
):
    w = start_worker(**SETTINGS)
    port, url = _refused_url(key)
    res = submit(client, w, url=url, dest=f"restarts/{key}.bin", deadline=120)
    for _ in range(2):
        wait_for(lambda: _parked(client, res.id), 90, "the next attempt to be parked")
        failed = _failed_attempts(client, res.id)
        assert w.stop(signal.SIGTERM) == 0
        w.start(client)
        # The restarted worker's sweep wakes the parked attempt, which runs and fails again.
        wait_for(lambda f=failed: _failed_attempts(client, res.id) > f, 60, "a new attempt")

    origin = OriginServer(port=port).start()
    try:
        result = res.get(timeout=90)
    finally:
        origin.stop()
    assert result["sha256"] == body_sha256(5000, key)
    assert len(origin.stats.for_key(key)) == 1  # one transfer
    assert [p.name for p in (w.download_dir / "restarts").iterdir()] == [f"{key}.bin"]
    assert not list((w.download_dir / ".partial").glob("*.part"))
    assert not _parked(client, res.id)


def test_an_origin_down_past_the_default_deadline_fails_at_it_saying_so(client, start_worker, key):
    w = start_worker(DOWNLOAD_DEADLINE="10", **SETTINGS)  # for downloads without the argument
    port, url = _refused_url(key)
    res = submit(client, w, url=url, dest=f"late/{key}.bin")
    with pytest.raises(Exception) as info:
        res.get(timeout=90)
    said = (
        rf"connection refused by 127\.0\.0\.1:{port}, gave up at the deadline after (\d+) "
        r"attempts over ([0-9.]+) s"
    )
    told = re.fullmatch(said, str(info.value))
    assert res.state == "FAILURE" and told, str(info.value)
    # Backoff from 1 s doubling cannot fill 10 s in 4 waits: the attempt budget (4) did not end
    # it, and the last attempt ran at the deadline, not before.
    assert int(told.group(1)) >= 5 and float(told.group(2)) >= 9.5
    deadline = float(client.backend.client.get(f"downloads:deadline:{res.id}"))
    assert 0 <= _done_at(res) - deadline <= CAP_S  # within one backoff step after it


def _done_at(res: AsyncResult) -> float:
    done = res.date_done
    return float(done.replace(tzinfo=done.tzinfo or UTC).timestamp())


def test_without_a_deadline_the_result_says_so_and_counts_the_waits_for_retries(
    client, patient, origin, key
):
    result = submit(client, patient, url=f"{origin.url}/bytes/10?flaky=1&key={key}").get(30)
    assert result["attempts"] == 2 and result["deadline"] is None
    assert 0 < result["retried_s"] <= 1  # the first backoff step: up to 1 s


def test_a_deadline_that_had_passed_when_a_worker_took_it_fails_at_once(client, patient, key):
    _, url = _refused_url(key)
    state, message = failure(client, patient, url=url, deadline="2020-01-01T00:00:00Z")
    assert state == "FAILURE"
    assert message == "deadline: 2020-01-01T00:00:00Z had passed when a worker took the download"


def test_a_bad_deadline_fails_at_once_naming_the_argument(client, patient, key):
    _, url = _refused_url(key)
    state, message = failure(client, patient, url=url, deadline="tomorrow evening")
    assert state == "FAILURE" and message.startswith("deadline: 'tomorrow evening' is not an ISO")


def test_a_permanent_error_ends_a_download_with_a_deadline_at_once(client, patient, origin, key):
    url = f"{origin.url}/bytes/10?status=404&key={key}"
    state, message = failure(client, patient, url=url, deadline=600)
    assert state == "FAILURE" and message.endswith("HTTP 404 Not Found from " + origin.url[7:])
    assert len(origin.stats.for_key(key)) == 1


def test_the_poison_guard_stops_a_download_with_a_deadline(client, start_worker, origin, key):
    w = start_worker(DOWNLOAD_MAX_DELIVERIES="2", **SETTINGS)
    url = f"{origin.url}/bytes/3000000?rate=300000&key={key}&noetag=1&nolm=1"
    res = submit(client, w, url=url, dest=f"poison/{key}.bin", deadline=600)
    kill_each_delivery(client, w, origin, key, res.id, 2)
    with pytest.raises(Exception, match="died each time"):
        res.get(timeout=60)
    assert len(origin.stats.for_key(key)) == 2


@pytest.mark.timeout(600)  # generous waits: a loaded machine parks slowly
def test_redis_restarted_during_the_outage_loses_nothing_and_transfers_once(tmp_path, key):
    """Redis (its own, persistent as compose runs it: AOF fsynced per write) is killed and
    started again while the next attempt is parked in it."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis", persistent=True)
    server.start()
    own = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    own.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    ddir = tmp_path / "dl"
    env = worker_env(server.url, ddir, **SETTINGS)
    w = Worker(env, "redis-restart", "redis-restart", tmp_path / "worker.log", ddir, ["-c", "2"])
    w.start(own)
    port, url = _refused_url(key)
    try:
        res = submit(own, w, url=url, dest=f"restart/{key}.bin", deadline=120)
        wait_for(lambda: _parked(own, res.id), 90, "the next attempt to be parked")
        failed = _failed_attempts(own, res.id)
        server.kill()
        server.start()
        # Parked in the AOF, the attempt is woken by the reconnected sweep and fails again.
        wait_for(lambda: _failed_attempts(own, res.id) > failed, 60, "an attempt after Redis")
        origin = OriginServer(port=port).start()
        try:
            result = res.get(timeout=90)
        finally:
            origin.stop()
        assert res.state == "SUCCESS" and result["sha256"] == body_sha256(5000, key)
        assert result["resumed_from"] == 0
        assert len(origin.stats.for_key(key)) == 1  # one whole transfer
        assert [p.name for p in (ddir / "restart").iterdir()] == [f"{key}.bin"]
        assert not list((ddir / ".partial").glob("*.part"))
        # A copy parked again around the crash is published when due, finds the SUCCESS and
        # leaves: nothing stays parked for a download that ended.
        wait_for(lambda: not _parked(own, res.id), 60, "nothing left parked")
    finally:
        w.stop()
        server.stop()


# The suite's crowd. 5,000 is a hand run (DEADLINE_CROWD=5000, with -s for the
# figures): it takes about two minutes on two cores.
CROWD = int(os.environ.get("DEADLINE_CROWD", "1000"))
SLOTS = 4
# The worker's memory is read once a fifth of the crowd is parked (each child has run parks by
# then, as it will: its first runs load code and fill caches, a fixed cost a child) and again
# once all are (tests/crowd.py, assert_flat).


@pytest.mark.timeout(600)  # generous waits: a loaded machine parks slowly
def test_a_crowd_waiting_a_day_on_a_dead_origin_holds_no_slot_and_no_worker_memory(
    tmp_path, origin, key
):
    """CROWD downloads with a one-day deadline on an origin that refuses every connection, with
    the default DOWNLOAD_PARK_AFTER: all parked in Redis, none in the queue or held by the
    worker; the worker's SLOTS run a batch of ordinary downloads at once meanwhile, its memory
    does not grow with the crowd, and after a restart they all still wait."""
    (tmp_path / "redis").mkdir()
    server = RedisServer(tmp_path / "redis")
    server.start()
    own = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    own.conf.update(accept_content=["json"])
    ddir = tmp_path / "dl"
    env = worker_env(server.url, ddir, **crowd.SETTINGS)
    w = Worker(env, "crowd", "crowd", tmp_path / "worker.log", ddir, ["-c", str(SLOTS)])
    w.start(own)
    broker, backend = redis.Redis(port=server.port, db=0), redis.Redis(port=server.port, db=1)
    ids: list[str] = []

    def all_parked() -> bool:
        """All in the due set and in RETRY at once, none queued or held by the worker (one
        whose time came is briefly neither: it runs, fails and is parked again)."""
        held = crowd.held_by_redis(broker, w.queue, ids)
        parked = crowd.parked(backend, ids) == len(ids) and not held
        return parked and crowd.states(backend, ids) == {"RETRY": len(ids)}

    try:
        crowd.every_slot_busy(own, w, origin, SLOTS, f"{key}-warm")  # every child has run one
        ids += crowd.submit_crowd(own, w, CROWD // 5, f"{key}-a")
        wait_for(all_parked, 240 * CROWD / 5000, f"the first {len(ids)} parked, none held")
        first = crowd.memory(w)
        ids += crowd.submit_crowd(own, w, CROWD - len(ids), f"{key}-b")
        wait_for(all_parked, 240 * CROWD / 1000, f"all {CROWD} parked, none held")
        assert crowd.every_slot_busy(own, w, origin, SLOTS, key) == SLOTS
        then = crowd.memory(w)
        print(f"\nthe worker with {CROWD // 5} parked: {first}; with {CROWD}: {then}")

        assert w.stop(signal.SIGTERM) == 0
        w.start(own)
        wait_for(all_parked, 120, f"all {CROWD} parked after the restart")  # none FAILED or lost
        crowd.assert_flat(first, then)
    finally:
        w.stop()
        broker.close()
        backend.close()
        server.stop()


def test_flower_shows_when_the_next_attempt_is_due_and_when_the_deadline_ends(
    client, start_worker, flower, key
):
    w = start_worker(**crowd.SETTINGS)  # an hour's backoff: it stays in RETRY
    port, url = _refused_url(key)
    res = submit(client, w, url=url, dest=f"flower/{key}.bin", deadline=crowd.DAY_S)
    try:
        info = flower.wait_state(res.id, "RETRY")
        reason = rf"connection refused by 127\.0\.0\.1:{port}"
        shown = rf"{reason}; next attempt due {DUE_TIME}, deadline {DUE_TIME}"
        assert re.fullmatch(shown, info["exception"]), info["exception"]
    finally:
        crowd.unpark(client.backend.client, [res.id])  # the session's workers share the due set


AHEAD = {"DOWNLOAD_RETRY_BACKOFF": "0.5", "DOWNLOAD_RETRY_BACKOFF_MAX": "2",
         "DOWNLOAD_PARK_AFTER": "0"}  # fmt: skip
BACKLOG = 30  # downloads of half a second each, queued behind a parked attempt
AHEAD_BOUND = 10


def due_ahead_of_a_backlog(client: Celery, worker: Worker, origin: OriginServer, key: str) -> None:
    """A worker of one slot (settings AHEAD). A download with a deadline waits parked for its
    next attempt while its origin is down; 30 downloads are queued behind it meanwhile. Once its
    origin is back, its next attempt comes through the woken lane: at most AHEAD_BOUND of the
    queued downloads start between the origin's return and its request (its backoff and the
    one running), not all 30, as when the woken attempt joined the end of the queue."""
    port, url = _refused_url(key)
    first = submit(client, worker, url=url, dest=f"ahead/{key}.bin", deadline=300)
    wait_for(lambda: _failed_attempts(client, first.id) >= 1, 60, "a failed attempt")
    slow = f"{origin.url}/bytes/20000?rate=40000&key={key}-b"
    backlog = [
        submit(client, worker, url=f"{slow}{i}&seed={i}", dest=f"ahead/{key}-{i}.bin")
        for i in range(BACKLOG)
    ]
    wait_for(lambda: len(origin.stats.started(f"{key}-b")) >= 2, 60, "the backlog running")
    back = OriginServer(port=port).start()
    try:
        up = time.monotonic()
        assert first.get(timeout=120)["sha256"] == body_sha256(5000, key)
        [came] = back.stats.for_key(key)
    finally:
        back.stop()
    between = sum(up <= at < came.at for at in origin.stats.started(f"{key}-b"))
    assert between <= AHEAD_BOUND, f"{between} queued downloads started before the woken one"
    assert all(r.get(timeout=120)["size"] == 20000 for r in backlog)
