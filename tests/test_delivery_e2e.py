"""What is accepted is finished: downloads that end while Redis is away, tasks waiting for a busy
destination, and a warm shutdown that runs out of time."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import submit
from tests.harness import RedisServer, Worker, wait_for, worker_env
from tests.server import OriginServer, body_sha256


def _worker(server: RedisServer, client: Celery, tmp_path: Path, name: str, **env: str) -> Worker:
    settings = worker_env(server.url, tmp_path / "dl", **env)
    w = Worker(settings, name, "q", tmp_path / f"{name}.log", tmp_path / "dl", ["-c", "3"])
    return w.start(client)


def _get(origin: OriginServer, key: str) -> int:
    return len(origin.stats.for_key(key))


@pytest.mark.parametrize("outage", [4, 65])
def test_downloads_that_end_while_redis_is_away_end_success(
    crashable_redis, origin, tmp_path, outage
):
    server, client = crashable_redis
    # A short grace: after a long outage the messages put back are redelivered while their
    # originals run, and a copy still busy at shutdown must not hold the stop for 90 s.
    w = _worker(server, client, tmp_path, f"outage{outage}", DOWNLOAD_RESULT_OUTAGE="120",
                DOWNLOAD_SHUTDOWN_GRACE="10")  # fmt: skip
    size = 300_000
    # Each finishes at a different moment: its body starts after Redis died, ends during the
    # outage, ends after Redis is back; a fourth waits in the queue the whole time.
    cases = {
        "before": f"stall=1.5&rate={size * 2}",
        "during": f"rate={size / (outage / 2 + 1):.0f}",
        "after": f"rate={size / (outage + 4):.0f}",
        "queued": "",
    }
    results = {}
    try:
        for case, query in cases.items():
            url = f"{origin.url}/bytes/{size}?seed={case}{outage}&key={case}{outage}&{query}"
            results[case] = submit(client, w, url=url, dest=f"{case}.bin")
        running = [results[c] for c in ("before", "during", "after")]
        wait_for(lambda: all(r.state in ("STARTED", "PROGRESS") for r in running), 30, "starts")
        server.kill()
        time.sleep(outage)  # the outage itself, not a synchronisation
        server.start()
        for case, res in results.items():
            got = res.get(timeout=outage + 120)
            assert got["sha256"] == body_sha256(size, f"{case}{outage}"), case
            assert res.state == "SUCCESS"
            assert _get(origin, f"{case}{outage}") == 1, f"{case}: transferred again"
            assert (tmp_path / "dl" / f"{case}.bin").stat().st_size == size
    finally:
        assert w.stop(timeout=60) == 0


def test_a_retry_waiting_for_its_countdown_survives_a_redis_crash(
    crashable_redis, origin, tmp_path
):
    """The worker holds a retry until its countdown ends; Redis crashes meanwhile and Celery
    drops what it held. The message is put back once Redis answers again, not after the
    visibility timeout (an hour here), and the worker stays up."""
    server, client = crashable_redis
    w = _worker(
        server,
        client,
        tmp_path,
        "countdown",
        DOWNLOAD_RETRY_BACKOFF_MAX="8",
        DOWNLOAD_VISIBILITY_TIMEOUT="3600",
        # The first run's ack can be lost with the connection: its copy, put back, may still be
        # busy at the stop, which must not wait 90 s for it.
        DOWNLOAD_SHUTDOWN_GRACE="10",
    )
    url = f"{origin.url}/bytes/5000?seed=cd&key=cd&flaky=1&fail=429&retry_after=8"
    try:
        res = submit(client, w, url=url, dest="countdown.bin")
        wait_for(lambda: res.state == "RETRY", 30, "the retry to be scheduled")
        server.kill()
        time.sleep(2)  # the outage itself, not a synchronisation
        server.start()
        assert res.get(timeout=90)["attempts"] == 2
        assert _get(origin, "cd") == 2
        assert "Unrecoverable error" not in w.log()
    finally:
        assert w.stop() == 0


def test_a_busy_destination_is_waited_for_without_a_child_or_the_fault_budget(
    client, start_worker, origin, key
):
    """A holder downloads for about 15 s (cut once, so it retries in between); a task for the
    same destination and another URL then meets two faults; an identical task shares the
    holder's result. The worker has 2 children and a budget of 2 retries. How many re-sends a
    wait of an hour costs is tests/test_journey.py's (the waits' backoff, in-process)."""
    w = start_worker(DOWNLOAD_MAX_RETRIES="2")
    size = 300_000
    holder_url = f"{origin.url}/bytes/{size}?seed={key}&key={key}&rate=20000&cut=75000&cut_times=1"
    holder = submit(client, w, url=holder_url, dest="same.bin")
    wait_for(lambda: holder.state == "PROGRESS", 30, "the holder to run")
    other = submit(
        client, w, url=f"{origin.url}/bytes/5000?seed=o&key={key}o&flaky=2", dest="same.bin"
    )
    twin = submit(client, w, url=holder_url, dest="same.bin")
    # Both wait without a child: a download elsewhere runs meanwhile on the second child.
    elsewhere = submit(client, w, url=f"{origin.url}/bytes/1000?seed=e", dest="elsewhere.bin")
    assert elsewhere.get(timeout=30)["size"] == 1000
    assert holder.state in ("PROGRESS", "RETRY", "STARTED")
    # Waiting is WAITING with its reason, never RETRY: the fault budget is not spent on it.
    wait_for(lambda: twin.state == "WAITING", 30, "the twin to wait for the destination")
    assert twin.info["reason"] == "destination" and twin.info["dest"] == "same.bin"

    first = holder.get(timeout=180)
    assert first["resumed_from"] == 75_000 and first["attempts"] == 2
    shared = twin.get(timeout=60)
    assert shared["skipped"] and shared["sha256"] == first["sha256"] == body_sha256(size, key)
    assert len(origin.stats.for_key(key)) == 2  # the holder's two; none of the twin's
    second = other.get(timeout=60)
    assert second["attempts"] == 3 and second["size"] == 5000  # two faults, then success
    holder_done = origin.stats.for_key(key)[-1].at
    assert all(r.at > holder_done for r in origin.stats.for_key(f"{key}o"))
    waits = w.log().count("for a busy destination")
    assert 0 < waits < 40, f"{waits} re-sends while waiting"


def test_a_warm_shutdown_requeues_what_outlives_its_grace(crashable_redis, origin, tmp_path, key):
    """Three deploys in a row (SIGTERM, a new worker): the slow download is requeued each time
    after DOWNLOAD_SHUTDOWN_GRACE, resumes on the next worker, and is not failed as a poison
    message although DOWNLOAD_MAX_DELIVERIES is 1; the quick one finishes within the grace."""
    server, client = crashable_redis
    env = {"DOWNLOAD_SHUTDOWN_GRACE": "2", "DOWNLOAD_MAX_DELIVERIES": "1"}
    size = 3_000_000
    slow_url = f"{origin.url}/bytes/{size}?seed={key}&key={key}&rate=100000"
    w = _worker(server, client, tmp_path, "deploy0", **env)
    slow = submit(client, w, url=slow_url, dest="slow.bin")
    quick = submit(client, w, url=f"{origin.url}/bytes/200000?key={key}q&rate=200000", dest="q")
    seen = 0
    for deploy in range(1, 4):
        wait_for(lambda s=seen: slow.state == "PROGRESS" and slow.info["bytes"] > s + 100_000, 30)
        seen = slow.info["bytes"]
        stopped = time.monotonic()
        assert w.stop(signal.SIGTERM, timeout=30) == 0
        # A generous deadline: the grace plus a stop takes a few seconds; waiting for the
        # download instead would take at least 26 s more (2.6 MB left at 100 kB/s).
        assert time.monotonic() - stopped < 20
        w = _worker(server, client, tmp_path, f"deploy{deploy}", **env)
    try:
        result = slow.get(timeout=90)
        assert result["resumed_from"] >= seen > 0
        assert result["sha256"] == body_sha256(size, key)
        assert quick.get(timeout=10)["size"] == 200000
        assert len(origin.stats.for_key(f"{key}q")) == 1  # finished in the grace: not again
        assert len(origin.stats.for_key(key)) == 4  # one request per deploy, each a resume
    finally:
        w.stop()


def test_a_retry_due_while_redis_is_away_is_not_lost(crashable_redis, origin, tmp_path):
    """The origin stalls past the read timeout, and Redis dies meanwhile: the retry is due while
    the broker is away. Its re-send waits for Redis to answer, or the message comes back; the
    download is never dropped as failed."""
    server, client = crashable_redis
    w = _worker(server, client, tmp_path, "resend", DOWNLOAD_READ_TIMEOUT="2",
                DOWNLOAD_RESULT_OUTAGE="3")  # fmt: skip
    url = f"{origin.url}/bytes/5000?seed=rs&key=rs&stall=4&stall_times=1"
    try:
        res = submit(client, w, url=url, dest="resend.bin")
        wait_for(lambda: _get(origin, "rs") == 1, 30, "the first request")
        server.kill()
        time.sleep(12)  # the outage itself, not a synchronisation
        server.start()
        assert res.get(timeout=120)["sha256"] == body_sha256(5000, "rs")
        assert res.state == "SUCCESS"
        assert "the next run was not sent" in w.log()  # the re-send did fail meanwhile
    finally:
        assert w.stop(timeout=60) == 0
