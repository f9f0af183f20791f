"""The ledger in-process, against the session's private Redis (a database of its own, flushed
around each test): a run's two round trips, claims, the poison guard, and stored states."""

from __future__ import annotations

import json
import uuid

import pytest
import redis

from download_client.arguments import DownloadRequest
from download_client.errors import PermanentError
from tasks import deliveries
from tasks.core import claims
from tasks.core.ledger import (
    Admit,
    Held,
    Ledger,
    Settle,
    State,
    attempts_key,
    claim_key,
    deliveries_key,
)

DB = 7


@pytest.fixture
def client(redis_db) -> redis.Redis:
    return redis_db(DB)


@pytest.fixture
def ledger(client) -> Ledger:
    return Ledger(client)


def _request(dest: str = "a/b.bin", url: str = "http://127.0.0.1:9/x") -> DownloadRequest:
    return DownloadRequest(url=url, dest=dest)


def _admit(task_id: str, retries: int = 0, waited_for: str | None = None, **kw) -> Admit:
    claim = claims.claim(_request(**kw), task_id, 60, waited_for)
    return Admit(task_id, retries, 600, f"meta-{task_id}", claim)


def _meta(status: str, compact: bool = False) -> str:
    meta = {"status": status, "result": {"size": 1}, "task_id": "t"}
    return json.dumps(meta, separators=(",", ":") if compact else None)


def test_the_first_run_takes_the_claim_and_a_second_task_sees_its_holder(ledger):
    first = ledger.admit(_admit("t1"))
    assert (first.holder, first.delivered, first.attempts, first.granted) == (None, 1, 1, False)
    assert ledger.admit(_admit("t2")).holder == Held("t1")


def test_a_run_of_the_holder_again_keeps_its_claim_and_counts_each_delivery(ledger):
    ledger.admit(_admit("t1"))
    again = ledger.admit(_admit("t1"))
    retried = ledger.admit(_admit("t1", retries=1))
    assert (again.holder, again.delivered, again.attempts) == (None, 2, 2)
    assert (retried.delivered, retried.attempts) == (1, 3)


def test_a_stored_end_is_read_as_json_whatever_its_spacing(ledger, client):
    for compact in (False, True):
        task_id = f"done-{compact}"
        client.set(f"meta-{task_id}", _meta("SUCCESS", compact))
        assert ledger.admit(_admit(task_id, dest=task_id)).holder == Held(task_id, self_done=True)
    for end in ("FAILURE", "REVOKED"):  # final too: a copy delivered again does not run
        client.set(f"meta-{end}", _meta(end, compact=True))
        assert ledger.admit(_admit(end, dest=end)).holder == Held(end, self_done=True)
    client.set("meta-retried", _meta("RETRY", compact=True))
    assert ledger.admit(_admit("retried", dest="retried")).holder is None


def test_a_waiter_takes_the_result_its_holder_left_and_only_for_the_same_download(ledger):
    holder = _admit("h")
    ledger.admit(holder)
    ledger.settle(Settle(claim=holder.claim, left={"size": 5}))
    took = ledger.admit(_admit("w", waited_for="h"))
    assert took.holder == Held("h", done={"size": 5})
    other = ledger.admit(_admit("w2", waited_for="h", url="http://127.0.0.1:9/other"))
    assert other.holder is None  # other bytes: it takes the destination and downloads


def test_settling_without_a_result_frees_the_destination_and_leaves_nothing(ledger, client):
    holder = _admit("h")
    ledger.admit(holder)
    ledger.settle(Settle(claim=holder.claim))
    assert client.get(claim_key("a/b.bin")) is None
    assert ledger.admit(_admit("w", waited_for="h")).holder is None


def test_a_claim_released_by_someone_else_stays(ledger):
    holder = _admit("h")
    ledger.admit(holder)
    ledger.release_claim(claims.claim(_request(), "not-h", 0))
    assert ledger.admit(_admit("w")).holder == Held("h")


def test_the_started_state_rides_in_the_admission_and_never_covers_a_success(ledger, client):
    started = State("meta-s", _meta("STARTED"), 60)
    ledger.admit(Admit("s", 0, 600, "meta-s", None, started))
    assert json.loads(client.get("meta-s"))["status"] == "STARTED"
    assert 0 < client.ttl("meta-s") <= 60
    assert ledger.store_state(State("meta-s", _meta("SUCCESS"), 0))
    ledger.admit(Admit("s", 1, 600, "meta-s", None, started))
    assert json.loads(client.get("meta-s"))["status"] == "SUCCESS"


def test_a_final_state_settles_its_run_in_the_same_round_trip(ledger, client):
    holder = _admit("h")
    ledger.admit(holder)
    final = State("meta-h", _meta("SUCCESS"), 60)
    settled = ledger.settle(
        Settle(final=final, claim=holder.claim, left={"size": 9}, bytes_for=("w1", 9))
    )
    assert settled.stored and settled.woken == []
    assert client.get(claim_key("a/b.bin")) is None
    assert ledger.totals() == ({"w1": 9}, {})
    again = ledger.settle(Settle(final=State("meta-h", _meta("FAILURE"), 60)))
    assert not again.stored  # a late copy never undoes a success


def test_only_new_stores_where_no_state_exists(ledger, client):
    assert ledger.store_state(State("meta-r", _meta("FAILURE"), 0), only_new=True)
    assert not ledger.store_state(State("meta-r", _meta("STARTED"), 0), only_new=True)


def test_the_poison_guard_gives_up_after_the_limit_and_uncounting_takes_runs_back(ledger, client):
    limit = 3
    for _ in range(limit):
        deliveries.check(ledger.admit(_admit("p")).delivered, limit)
    with pytest.raises(PermanentError, match="started 3 times"):
        deliveries.check(ledger.admit(_admit("p")).delivered, limit)
    ledger.uncount([("p", 0), ("p", 0)])
    assert int(client.get(deliveries_key("p", 0))) == 2
    ledger.settle(Settle(uncount=("p", 0)))  # a run that waited: neither delivery nor attempt
    assert int(client.get(deliveries_key("p", 0))) == 1
    assert int(client.get(attempts_key("p"))) == 3
    assert 0 < client.ttl(attempts_key("p")) <= 600


def test_notes_and_records_expire(ledger, client):
    task_id = str(uuid.uuid4())
    ledger.note_retry(task_id, '{"reason": "x"}', 5)
    ledger.record_given_up(task_id, {"why": "y"}, 5)
    ledger.count_recycled("w1", 1)
    assert all(0 < client.ttl(k) <= 5 for k in client.keys(f"*{task_id}*"))
    assert len(client.keys(f"*{task_id}*")) == 2
    assert ledger.totals() == ({}, {"w1": 1})
