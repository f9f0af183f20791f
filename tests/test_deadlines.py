"""Deadlines in-process: the argument and the settings, the wait cut at the deadline, the final
message, the deadline fixed at a download's first admission, and parking until a time in a
budget's due set, against the session's private Redis (a database of its own, flushed around
each test). The end-to-end behaviour is in tests/test_deadlines_e2e.py."""

from __future__ import annotations

import base64
import json
import time
import uuid

import pytest
import redis
from celery import Celery

from download_client import inputs, records, tables
from download_client.arguments import Deadline, parse
from download_client.client import submit
from download_client.errors import PermanentError
from download_client.settings import Settings, SettingsError
from tasks.core import budgets, origins
from tasks.core.failures import gave_up_at_deadline
from tasks.core.ledger import Admit, BudgetKeys, Ledger, deadline_key
from tasks.retries import Journey, retry_note, until_deadline
from tests.harness import wait_for, worker_env
from tests.test_cli_e2e import cli

DB = 9
URL = "http://127.0.0.1:9/x"


@pytest.fixture
def ledger(redis_db) -> Ledger:
    return Ledger(redis_db(DB))


@pytest.fixture
def client(ledger) -> redis.Redis:
    return ledger.client


def _deadline(value: object, now: float | None = None) -> Deadline | None:
    return parse((), {"url": URL, "deadline": value}, now=now).deadline


def test_a_deadline_is_seconds_from_the_first_admission_or_a_time_with_a_zone():
    assert _deadline(None) is None
    assert _deadline(120) == Deadline(seconds=120.0)
    assert _deadline(0.5).end(1000.0) == 1000.5  # type: ignore[union-attr]
    at = _deadline("2030-01-02T03:04:05Z")
    assert at == Deadline(at=1893553445.0) and at.end(0) == 1893553445.0
    assert _deadline("2030-01-02T05:04:05+02:00") == at
    # Positionally too, after callback_url.
    assert parse((URL, None, None, None, None, None, 60), {}).deadline == Deadline(seconds=60.0)


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (-5, "deadline: expected a positive number of seconds"),
        (0, "deadline: expected a positive number of seconds"),
        (float("nan"), "deadline: expected a positive number of seconds"),
        (float("inf"), "deadline: expected a positive number of seconds"),
        (True, "deadline: expected seconds (a number) or an ISO 8601 time"),
        ([60], "deadline: expected seconds (a number) or an ISO 8601 time"),
        ("tonight", "deadline: 'tonight' is not an ISO 8601 time (2026-12-08T18:00:00Z)"),
        ("60", "deadline: '60' is not an ISO 8601 time"),
        ("2030-01-02T03:04:05", "deadline: '2030-01-02T03:04:05' has no time zone (add Z"),
        ("2030-01-02", "deadline: '2030-01-02' has no time zone"),
    ],
)
def test_a_bad_deadline_is_refused_with_the_reason(value, said):
    with pytest.raises(PermanentError) as info:
        _deadline(value)
    assert str(info.value).startswith(said), str(info.value)


def test_a_deadline_that_has_passed_is_refused_where_a_producer_checks_it():
    """Workers parse the arguments again at every run, so only a producer (passing `now`) and a
    download's first admission (tests/test_deadlines_e2e.py) refuse a time that has passed."""
    with pytest.raises(PermanentError, match=r"^deadline: 2020-01-01T00:00:00Z has already passed"):
        _deadline("2020-01-01T00:00:00Z", now=time.time())
    assert _deadline("2020-01-01T00:00:00Z") == Deadline(at=1577836800.0)


def test_downloads_submit_refuses_a_line_whose_deadline_has_passed():
    lines = [
        '{"url": "http://127.0.0.1:9/a", "deadline": 3600}',
        '{"url": "http://127.0.0.1:9/b", "deadline": "2020-01-01T00:00:00Z"}',
    ]
    with pytest.raises(inputs.InputError) as info:
        list(inputs.read_downloads(lines, "list.jsonl", {}))
    assert str(info.value) == (
        "list.jsonl, line 2: deadline: 2020-01-01T00:00:00Z has already passed"
    )


def test_the_default_deadline_and_the_park_threshold_are_settings():
    s = Settings.from_env({})
    assert (s.deadline, s.park_after) == (0.0, 0.0)
    s = Settings.from_env({"DOWNLOAD_DEADLINE": "86400", "DOWNLOAD_PARK_AFTER": "30"})
    assert (s.deadline, s.park_after) == (86400.0, 30.0)
    for var in ("DOWNLOAD_DEADLINE", "DOWNLOAD_PARK_AFTER"):
        for bad in ("-1", "soon", "nan"):
            with pytest.raises(SettingsError, match=f"^{var}="):
                Settings.from_env({var: bad})


def test_the_last_wait_is_cut_so_an_attempt_runs_at_the_deadline():
    assert until_deadline(5.0, None, 100.0) == 5.0
    assert until_deadline(5.0, 110.0, 100.0) == 5.0
    assert until_deadline(5.0, 102.5, 100.0) == 2.5
    assert until_deadline(5.0, 99.0, 100.0) == 0.0


def test_the_final_word_says_it_gave_up_at_the_deadline_with_attempts_and_time():
    cause = "connection refused by 127.0.0.1:8080"
    assert gave_up_at_deadline(cause, 9, 61.2) == (
        "connection refused by 127.0.0.1:8080, gave up at the deadline after 9 attempts over 61 s"
    )
    assert gave_up_at_deadline(cause, 1, 0.0).endswith("after 1 attempt over 0.0 s")


def test_the_retry_note_and_the_cli_say_when_the_deadline_ends():
    before = time.time()
    note = json.loads(retry_note("HTTP 503", 4.0, 2, before + 7200))
    assert note["deadline"] == round(before + 7200, 3) and note["due"] >= round(before + 4, 3)
    assert "deadline" not in json.loads(retry_note("HTTP 503", 4.0, 2))
    parsed = records.parse_note(json.dumps(note))
    assert parsed is not None and parsed.deadline == note["deadline"]
    row = tables.retry_of(None, parsed)
    assert row["deadline"] == note["deadline"]
    text = tables.retry_text({**row, "deadline": 1893553445.0}, before)
    said = "next attempt in 4 s (attempt 2, deadline 2030-01-02T03:04:05Z): HTTP 503"
    assert text == said, text


def test_the_journey_counts_the_seconds_waited_for_retries():
    journey = Journey().after_fault(2.5).after_fault(4.0)
    assert (journey.faults, journey.retried_s, journey.waited_s) == (2, 6.5, 0.0)


def _admit(task_id: str, deadline: float | None) -> Admit:
    return Admit(task_id, 0, 600, f"meta-{task_id}", deadline=deadline)


def test_a_deadline_is_fixed_at_the_first_admission_and_kept_by_later_ones(ledger, client):
    first = ledger.admit(_admit("t1", 1000.5))
    assert (first.deadline, first.deadline_fixed_now) == (1000.5, True)
    # A redelivered or retried run offers its own end (now + seconds): the first one stays.
    later = ledger.admit(_admit("t1", 2000.0))
    assert (later.deadline, later.deadline_fixed_now) == (1000.5, False)
    assert 600 < client.ttl(deadline_key("t1")) <= 601
    none = ledger.admit(_admit("t2", None))
    assert (none.deadline, none.deadline_fixed_now) == (None, False)
    assert client.exists(deadline_key("t2")) == 0


def _message(task_id: str) -> str:
    return json.dumps({"id": task_id, "parked_at": time.time()})


def test_a_message_parked_until_a_time_is_handed_back_when_it_is_due(ledger, client):
    slots = origins.budget(lambda origin: 0)  # no cap: parking until a time needs none
    slots.park_until(ledger, _message("later"), 60)
    slots.park_until(ledger, _message("soon"), 0.3)
    published: list[str] = []
    assert slots.due(ledger, published.append) == 0  # nothing is due yet
    wait_for(lambda: slots.due(ledger, published.append), 10, "the message to be due")
    assert [json.loads(m)["id"] for m in published] == ["soon"]
    assert client.zcard(BudgetKeys("origin", "").due) == 1  # published and gone; "later" stays
    assert slots.due(ledger, published.append) == 0


def test_a_due_message_whose_publishing_failed_is_due_again_later(ledger, client):
    slots = origins.budget(lambda origin: 0)
    slots.park_until(ledger, _message("m"), 0)

    def broker_away(message: str) -> None:
        raise ConnectionError("the broker is away")

    wait_for(lambda: client.zcount(BudgetKeys("origin", "").due, 0, "+inf"), 5, "the park")
    with pytest.raises(ConnectionError):
        wait_for(lambda: slots.due(ledger, broker_away), 5, "a due message")
    # Taken for WAKING_STALE_MS: no other sweep publishes it meanwhile, and it is still there.
    published: list[str] = []
    assert slots.due(ledger, published.append) == 0
    assert client.zcard(BudgetKeys("origin", "").due) == 1
    due_at = client.zscore(BudgetKeys("origin", "").due, _due_member(client))
    assert due_at is not None and due_at > time.time() * 1000 + budgets.WAKING_STALE_MS - 5000
    # Once the time taken has passed (moved here rather than waited for), it is due again.
    client.zadd(BudgetKeys("origin", "").due, {_due_member(client): 0})
    assert [json.loads(m)["id"] for m in ledger.due("origin", 1000, 10)] == ["m"]


def _due_member(client: redis.Redis) -> str:
    [member] = client.zrange(BudgetKeys("origin", "").due, 0, -1)
    return member.decode()


def _queued_kwargs(broker: redis.Redis, queue: str) -> list[dict[str, object]]:
    """The keyword arguments of each message waiting in `queue` (Celery's protocol 2 body)."""
    bodies = [json.loads(raw)["body"] for raw in broker.lrange(queue, 0, -1)]
    return [json.loads(base64.b64decode(body))[1] for body in bodies]


def test_the_client_sends_seconds_as_the_time_they_end_counted_from_submission(
    redis_server, redis_db
):
    broker = redis_db(DB)
    app = Celery(broker=f"{redis_server.url}/{DB}", backend=f"{redis_server.url}/{DB}")
    before = time.time()
    submit(app, URL, deadline=60, queue="deadlines")
    submit(app, URL, deadline="2030-01-01T00:00:00Z", queue="deadlines")
    after = time.time()
    sent, given = _queued_kwargs(broker, "deadlines")[::-1]  # LPUSH: the newest first
    assert isinstance(sent["deadline"], str)
    end = _deadline(sent["deadline"])
    assert end is not None and end.at is not None
    assert before + 60 <= end.at <= after + 61  # whole seconds, rounded up
    assert given["deadline"] == "2030-01-01T00:00:00Z"


def test_downloads_submit_takes_a_deadline_in_seconds_or_as_a_time(redis_server, tmp_path):
    env = worker_env(redis_server.url, tmp_path)
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    queue = f"deadlines-{uuid.uuid4().hex[:6]}"
    before = time.time()
    for given in ("90", "2030-01-01T00:00:00+01:00"):
        done = cli(env, "submit", "--ids", "--queue", queue, "--deadline", given, URL)
        assert done.returncode == 0, done.stderr
    in_seconds, as_time = _queued_kwargs(broker, queue)[::-1]
    end = _deadline(in_seconds["deadline"])
    assert end is not None and end.at is not None and before + 90 <= end.at <= time.time() + 91
    assert as_time["deadline"] == "2030-01-01T00:00:00+01:00"
    refused = cli(env, "submit", "--queue", queue, "--deadline", "tonight", URL)
    assert refused.returncode == 2
    assert "deadline: 'tonight' is not an ISO 8601 time" in refused.stderr
    assert broker.llen(queue) == 2
