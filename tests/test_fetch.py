"""The task in-process (`apply()`), as Celery's own unit tests run theirs: the worker's app on the
session's private Redis (a database of its own), the loopback origin, and what one run leaves in
the ledger. End-to-end tests prove the same path through real worker processes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from download_client.contract import TASK_NAME
from download_client.errors import PermanentError
from download_client.settings import Settings
from tasks.core import claims, origins
from tasks.core.ledger import Admit, Ledger, attempts_key, claim_key, deliveries_key, done_key
from tests.harness import worker_env
from tests.server import body_sha256
from worker.celery_app import create_app

DB = 10


@pytest.fixture
def app(redis_server, tmp_path, monkeypatch) -> Iterator[Any]:
    env = worker_env(redis_server.url, tmp_path / "dl", DOWNLOAD_HOST_CONCURRENCY="1")
    env["CELERY_RESULT_BACKEND"] = f"{redis_server.url}/{DB}"
    app = create_app(Settings.from_env(env))
    # The final state is stored (and the run settles with it), as a worker stores it.
    monkeypatch.setattr(app.tasks[TASK_NAME], "store_eager_result", True)
    app.backend.client.flushdb()
    yield app
    app.backend.client.flushdb()


@pytest.fixture
def client(app) -> redis.Redis:
    return app.backend.client


def _apply(app: Any, task_id: str, **kwargs: Any) -> Any:
    return app.tasks[TASK_NAME].apply(kwargs=kwargs, task_id=task_id)


def test_a_run_admits_transfers_and_settles_in_the_ledger(app, client, origin):
    url = f"{origin.url}/bytes/3000?seed=inproc"
    result = _apply(app, "t-ok", url=url, dest="in/ok.bin").get()
    assert (result["size"], result["attempts"]) == (3000, 1)
    assert result["sha256"] == body_sha256(3000, "inproc")
    assert client.get(claim_key("in/ok.bin")) is None  # the destination is free again
    left = json.loads(client.get(done_key("t-ok")))
    assert left["done"]["sha256"] == result["sha256"]  # ... with the result left for waiters
    assert origins.stats(Ledger(client))["in_flight"].get(origins.origin_of(url), 0) == 0
    assert Ledger(client).totals()[0] == {str(result["worker"]): 3000}
    stored = json.loads(client.get(app.backend.get_key_for_task("t-ok")))
    assert stored["status"] == "SUCCESS"


def test_a_follower_takes_its_leaders_result_without_a_request(app, client, origin, key):
    url = f"{origin.url}/bytes/500?seed={key}&key={key}"
    leader = _apply(app, "leader", url=url, dest="in/shared.bin").get()
    task = app.tasks[TASK_NAME]
    follower = task.apply(
        kwargs={"url": url, "dest": "in/shared.bin"},
        task_id="follower",
        headers={"download_waiting_for": "leader", "download_waits": 1},
    ).get()
    assert follower["skipped"] and follower["sha256"] == leader["sha256"]
    assert len(origin.stats.for_key(key)) == 1
    assert client.get(attempts_key("follower")) == b"0"  # stepping aside is not an attempt


def test_a_busy_destination_is_waited_for_and_costs_no_attempt(app, client, origin):
    url = f"{origin.url}/bytes/100?seed=busy"
    other = claims.claim(_request(url, "in/busy.bin"), "holder", 60)
    Ledger(client).admit(Admit("holder", 0, 60, "unused", other))
    task = app.tasks[TASK_NAME]
    sent: list[dict[str, Any]] = []
    task.retry = lambda **kw: sent.append(kw)  # eager retries would run again at once
    state = task.apply(kwargs={"url": url, "dest": "in/busy.bin"}, task_id="waiter")
    assert state.state == "IGNORED"  # a wait is not a retry: neither RETRY nor task-retried
    assert "another task is downloading" in str(sent[0]["exc"]) and sent[0]["throw"] is False
    assert sent[0]["headers"]["download_waits"] == 1 and sent[0]["countdown"] > 0
    stored = json.loads(client.get(app.backend.get_key_for_task("waiter")))
    assert stored["status"] == "WAITING"
    assert stored["result"]["reason"] == "destination"
    assert stored["result"]["dest"] == "in/busy.bin" and stored["result"]["since"] > 0
    assert client.get(attempts_key("waiter")) == b"0"
    assert json.loads(client.get(claim_key("in/busy.bin")))["task"] == "holder"


def test_a_poison_message_frees_its_destination(app, client, origin):
    url = f"{origin.url}/bytes/100?seed=poison"
    limit = Settings.from_env({}).max_deliveries
    client.set(deliveries_key("p", 0), limit)  # each delivery so far died
    state = _apply(app, "p", url=url, dest="in/poison.bin")
    assert isinstance(state.result, PermanentError) and "died each time" in str(state.result)
    assert client.get(claim_key("in/poison.bin")) is None


def _request(url: str, dest: str) -> Any:
    from download_client.arguments import DownloadRequest

    return DownloadRequest(url=url, dest=dest)
