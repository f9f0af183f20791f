"""The result backend against a real Redis: a stored SUCCESS is never overwritten (a lost
worker's late copy must not undo a finished download), nor a FAILURE or REVOKED by a state that
is not final, each state reaches the pollers and the subscribers, and one state costs one
round trip."""

from __future__ import annotations

import json
import math
import time
import uuid

import pytest
import redis

from download_client.settings import Settings
from tasks.core.budgets import RENEW_S
from tests.harness import worker_env
from worker.celery_app import create_app


@pytest.fixture
def backend(redis_server, tmp_path):
    app = create_app(Settings.from_env(worker_env(redis_server.url, tmp_path)))
    return app.backend


def _stored(redis_server, task_id: str) -> dict:
    raw = redis.Redis.from_url(f"{redis_server.url}/1").get(f"celery-task-meta-{task_id}")
    return json.loads(raw)


def test_a_failure_or_revoke_is_replaced_only_by_another_end(backend, redis_server):
    """A run's RETRY may reach Redis after the run its re-sent message started has failed
    (Celery sends the retry before it stores RETRY, and that store may wait out a Redis
    outage, as the chaos soak found): the FAILURE stays."""
    for end in ("FAILURE", "REVOKED"):
        task_id = str(uuid.uuid4())
        backend.store_result(task_id, RuntimeError("gave up"), end)
        backend.store_result(task_id, RuntimeError("HTTP 500, retrying"), "RETRY")
        backend.store_result(task_id, {"bytes": 5, "total": 9}, "PROGRESS")
        backend.store_result(task_id, None, "STARTED")
        assert _stored(redis_server, task_id)["status"] == end
        backend.store_result(task_id, {"size": 1}, "SUCCESS")  # another copy's end: stored
        assert _stored(redis_server, task_id)["status"] == "SUCCESS"


def test_a_success_is_never_overwritten_by_a_late_copy(backend, redis_server):
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, {"size": 1}, "SUCCESS")
    backend.store_result(task_id, None, "STARTED")
    backend.store_result(task_id, {"bytes": 5, "total": 9}, "PROGRESS")
    stored = _stored(redis_server, task_id)
    assert (stored["status"], stored["result"]) == ("SUCCESS", {"size": 1})


def test_other_states_follow_each_other_and_expire(backend, redis_server):
    task_id = str(uuid.uuid4())
    backend.store_result(task_id, None, "STARTED")
    backend.store_result(task_id, {"bytes": 5, "total": 9}, "PROGRESS")
    assert _stored(redis_server, task_id)["result"] == {"bytes": 5, "total": 9}
    backend.store_result(task_id, {"size": 9}, "SUCCESS")
    stored = _stored(redis_server, task_id)
    assert (stored["status"], stored["task_id"]) == ("SUCCESS", task_id)
    ttl = redis.Redis.from_url(f"{redis_server.url}/1").ttl(f"celery-task-meta-{task_id}")
    assert 0 < ttl <= backend.expires


def test_subscribers_hear_each_state(backend, redis_server):
    task_id = str(uuid.uuid4())
    sub = redis.Redis.from_url(f"{redis_server.url}/1").pubsub()
    sub.subscribe(f"celery-task-meta-{task_id}")
    assert sub.get_message(timeout=5)["type"] == "subscribe"
    backend.store_result(task_id, {"size": 2}, "SUCCESS")
    heard = sub.get_message(timeout=5)
    assert json.loads(heard["data"])["status"] == "SUCCESS"
    sub.close()


def test_a_state_costs_one_round_trip(backend, redis_server, monkeypatch):
    sent = []
    real = redis.connection.AbstractConnection.send_packed_command
    monkeypatch.setattr(
        redis.connection.AbstractConnection,
        "send_packed_command",
        lambda self, *a, **k: sent.append(1) or real(self, *a, **k),
    )
    backend.client.ping()  # the connection is open before counting
    sent.clear()
    backend.store_result(str(uuid.uuid4()), {"size": 3}, "SUCCESS")
    assert len(sent) == 1


def test_a_download_costs_its_worker_process_two_round_trips(
    start_worker, client, origin, tmp_path
):
    """STARTED with the claim, the delivery count and the origin slot; SUCCESS with the claim's
    release, the slot's and the byte count: as many round trips as a task that does nothing."""
    from tests.conftest import submit

    counts = tmp_path / "roundtrips"
    counts.mkdir()
    w = start_worker(
        extra=["--include=tests.roundtrips"],
        concurrency=1,
        DOWNLOAD_HOST_CONCURRENCY="8",
        ROUNDTRIPS_DIR=str(counts),
        WORKER_MAX_TASKS_PER_CHILD="0",
    )
    n = 40
    began = time.monotonic()
    res = [submit(client, w, url=f"{origin.url}/bytes/2000?seed={i}", dest=f"rt/{i}.bin")
           for i in range(n)]  # fmt: skip
    assert all(r.get(timeout=60)["size"] == 2000 for r in res)
    held_s = time.monotonic() - began
    w.stop()
    (child,) = [int(p.read_text()) for p in counts.iterdir()]
    connecting = 10  # a child's first commands: connections opened, scripts loaded
    # The process's one lease renewal a RENEW_S while it holds an origin slot: a round trip per
    # time held, not per download (more of them on a slower, loaded machine).
    renewals = math.ceil(held_s / RENEW_S) + 1
    assert child <= 2 * n + connecting + renewals, (child, renewals)
