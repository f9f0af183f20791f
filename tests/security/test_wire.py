"""JSON only; no other content type is ever deserialized, and no message
stops the worker."""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from kombu import Connection, Producer

from tests.harness import Worker, wait_for
from tests.security.conftest import Sandbox


class _Touch:
    """Unpickling this calls open(path, "w"): the file exists iff the payload was deserialized."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def _refusals(worker: Worker) -> int:
    log = worker.log()
    return log.count("Refusing to deserialize untrusted content") + log.count("refused a message")


def _raw_message(
    client: Celery, queue: str, body: bytes, content_type: str, encoding: str = "binary"
) -> str:
    tid = str(uuid.uuid4())
    headers = {
        "lang": "py",
        "task": "downloads.fetch",
        "id": tid,
        "root_id": tid,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "retries": 0,
    }
    with Connection(client.conf.broker_url) as conn:
        Producer(conn).publish(
            body,
            routing_key=queue,
            content_type=content_type,
            content_encoding=encoding,
            headers=headers,
            delivery_mode=2,
        )
    return tid


@pytest.mark.parametrize(
    "content_type",
    [
        "application/x-python-serialize",
        "application/data",  # kombu passes these two through undecoded ("trusted")
        "application/text",
        "application/x-yaml",
    ],
)
def test_non_json_message_is_never_deserialized(
    client: Celery, sec: Worker, sandbox: Sandbox, tmp_path: Path, content_type: str
) -> None:
    touched = tmp_path / "unpickled"
    payload = pickle.dumps(((), {"url": _Touch(touched)}, {}), protocol=2)
    refusals = _refusals(sec)
    tid = _raw_message(client, sec.queue, payload, content_type)
    # The worker drops it (logged); the next task proves it went past it, not around it.
    wait_for(lambda: _refusals(sec) > refusals, 30, "the worker to log the refused message")
    sandbox.serves(client, sec)
    assert not touched.exists(), "the pickle payload was deserialized"
    # Its producer hears why at once (tests/test_refusals_e2e.py covers the rest).
    refused = client.AsyncResult(tid)
    wait_for(lambda: refused.state == "FAILURE", 30, "the refusal to be stored")
    assert "refused" in str(refused.result)
    assert sec.proc is not None and sec.proc.poll() is None, "the worker stopped"


@pytest.mark.parametrize(
    "body", ['"x"', "null", "{}", "[1, 2]", "[5, {}, {}]", '[[], "xy", {}]', "[[], {}, 5]"]
)
def test_json_message_of_the_wrong_shape_is_discarded(
    client: Celery, sec: Worker, sandbox: Sandbox, body: str
) -> None:
    refusals = _refusals(sec)
    _raw_message(client, sec.queue, body.encode(), "application/json", "utf-8")
    wait_for(lambda: _refusals(sec) > refusals, 30, "the worker to log the refused message")
    sandbox.serves(client, sec)
    assert sec.proc is not None and sec.proc.poll() is None, "the worker stopped"


def test_pickle_via_send_task_is_never_deserialized(
    client: Celery, sec: Worker, sandbox: Sandbox, tmp_path: Path
) -> None:
    touched = tmp_path / "unpickled"
    refusals = _refusals(sec)
    client.send_task(
        "downloads.fetch",
        kwargs={"url": _Touch(touched)},
        queue=sec.queue,
        serializer="pickle",
        kwargsrepr="{}",
    )
    wait_for(lambda: _refusals(sec) > refusals, 30, "the worker to log the refused message")
    sandbox.serves(client, sec)
    assert not touched.exists(), "the pickle payload was deserialized"
