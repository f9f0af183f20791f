"""Messages the worker must refuse, planted with secrets in every place a producer can put them
(body, headers, argsrepr/kwargsrepr): each producer hears why at once (a FAILURE under its id),
no state of an existing task is overwritten, and no secret reaches any line of the worker's log."""

from __future__ import annotations

import json
import pickle
import uuid
from typing import Any

import pytest
from kombu import Connection, Producer

from tests.conftest import run
from tests.harness import wait_for

SECRET = f"refused-secret-{uuid.uuid4().hex}"


def _headers(tid: str, task: str = "downloads.fetch") -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": tid,
        "root_id": tid,
        "argsrepr": f"('https://h.test/a?token={SECRET}',)",
        "kwargsrepr": f"{{'headers': {{'Authorization': 'Bearer {SECRET}'}}}}",
        "x-caller": SECRET,
    }


def _publish(client, queue: str, body: bytes, content_type: str, headers: dict[str, Any], tid: str):
    with Connection(client.conf.broker_url) as conn:
        Producer(conn).publish(
            body,
            routing_key=queue,
            content_type=content_type,
            content_encoding="utf-8" if "json" in content_type else "binary",
            headers=headers,
            correlation_id=tid,
        )


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


KWARGS = {"url": f"https://h.test/a?token={SECRET}", "headers": {"Authorization": SECRET}}
# (name, content type, body, protocol 2 headers?, task name)
SHAPES = [
    ("pickle, protocol 2", "application/x-python-serialize", pickle.dumps(((), KWARGS, {})), True),
    ("undecoded data", "application/data", SECRET.encode(), True),
    ("yaml", "application/x-yaml", f"url: {SECRET}".encode(), True),
    ("an object under protocol 2", "application/json", _json(KWARGS), True),
    ("a list of two", "application/json", _json([[SECRET], KWARGS]), True),
    ("pickle, protocol 1", "application/x-python-serialize", pickle.dumps({"task": SECRET}), False),
    ("broken JSON, protocol 1", "application/json", f'{{"task": "{SECRET}'.encode(), False),
    ("kwargs not an object", "application/json", None, False),
    ("not a task message", "application/json", _json([SECRET, KWARGS]), False),
]


@pytest.fixture(scope="module")
def refuser(start_worker):
    return start_worker(concurrency=1)


@pytest.mark.parametrize(("name", "ctype", "body", "proto2"), SHAPES, ids=[s[0] for s in SHAPES])
def test_a_refused_message_fails_at_once_and_logs_no_secret(
    client, refuser, origin, name, ctype, body, proto2
):
    tid = str(uuid.uuid4())
    if body is None:
        body = _json({"task": "downloads.fetch", "id": tid, "args": [SECRET], "kwargs": SECRET})
    headers = _headers(tid) if proto2 else {"x-caller": SECRET}
    _publish(client, refuser.queue, body, ctype, headers, tid)
    refused = client.AsyncResult(tid)
    wait_for(lambda: refused.state == "FAILURE", 30, f"the refusal of {name} to be stored")
    assert "the worker refused the message" in str(refused.result)
    assert SECRET not in str(refused.result)
    wait_for(lambda: f"refused message {tid}" in refuser.log(), 10, "the refusal's log line")
    # The worker goes on: a normal download after it.
    run(client, refuser, url=f"{origin.url}/bytes/100?seed=after", dest=f"after/{tid}")
    log = refuser.log()
    assert SECRET not in log
    assert "The full contents of the message" not in log and "body:" not in log


def test_an_unknown_task_is_refused_the_same_way(client, refuser):
    tid = str(uuid.uuid4())
    _publish(
        client,
        refuser.queue,
        _json([[], KWARGS, {}]),
        "application/json",
        _headers(tid, task="downloads.fetch_v9"),
        tid,
    )
    refused = client.AsyncResult(tid)
    wait_for(lambda: refused.state == "FAILURE", 30, "the refusal to be stored")
    assert "no task named 'downloads.fetch_v9'" in str(refused.result)
    assert SECRET not in refuser.log()


def test_a_refused_copy_never_overwrites_a_task_state(client, refuser, origin):
    done = client.send_task(
        "downloads.fetch",
        kwargs={"url": f"{origin.url}/bytes/200?seed=kept", "dest": f"kept/{uuid.uuid4().hex}"},
        queue=refuser.queue,
    )
    first = done.get(timeout=30)
    # A refused message with the same id: logged, not stored.
    _publish(
        client, refuser.queue, _json({"url": 1}), "application/json", _headers(done.id), done.id
    )
    wait_for(lambda: f"refused message {done.id}" in refuser.log(), 30, "the refusal's log line")
    run(client, refuser, url=f"{origin.url}/bytes/100?seed=after2", dest=f"after/{done.id}")
    again = client.AsyncResult(done.id)
    assert again.state == "SUCCESS" and again.result == first
