"""Producers nobody here wrote submit downloads and read what they get back: a bare Celery app, the
`celery call` command, celery-node in task protocols 2 and 1, and a protocol 1 message published
by hand with kombu (so protocol 1 is tested even where node is missing); the first two also to a
submitter group's queue."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest
from kombu import Connection, Producer

from download_client import RESULT_KEYS
from download_client.client import submit
from download_client.groups import group_queue
from tests.harness import wait_for
from tests.server import body_sha256
from tests.third_party import bare_producer, celery_call, celery_node


def _urls(redis_server):
    return f"{redis_server.url}/0", f"{redis_server.url}/1"


def _check_file(worker, result, size, seed):
    path = Path(worker.download_dir) / result["path"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == body_sha256(size, seed)


def test_a_bare_celery_app_submits_and_reads_progress_and_result(redis_server, worker, origin):
    broker, backend = _urls(redis_server)
    url = f"{origin.url}/bytes/600000?rate=600000&seed=bare&author=bob&code=200"
    seen = bare_producer(broker, backend, worker.queue, url=url, dest=f"bare/{uuid.uuid4().hex}")
    assert seen["project_modules"] == []
    assert seen["states"][-1] == "SUCCESS" and "PROGRESS" in seen["states"]
    assert all(isinstance(p["bytes"], int) and p["total"] == 600000 for p in seen["progress"])
    result = seen["result"]
    assert set(result) == set(RESULT_KEYS)
    assert result["url"] == url and result["final_url"] == url  # nothing in it is a secret
    _check_file(worker, result, 600000, "bare")


def test_celery_call_with_no_app_submits_by_name(redis_server, client, worker, origin):
    broker, backend = _urls(redis_server)
    url = f"{origin.url}/bytes/3000?seed=call"
    tid = celery_call(
        broker, backend, worker.queue, {"url": url, "dest": f"call/{uuid.uuid4().hex}"}
    )
    result = client.AsyncResult(tid).get(timeout=30)
    assert result["size"] == 3000 and result["url"] == url
    _check_file(worker, result, 3000, "call")


def test_a_protocol_1_message_published_with_kombu_runs(redis_server, client, worker, origin):
    tid = str(uuid.uuid4())
    url = f"{origin.url}/bytes/5000?seed=proto1"
    body = {
        "task": "downloads.fetch",
        "id": tid,
        "args": [url],
        "kwargs": {"dest": f"p1/{tid}.bin"},
        "retries": 0,
        "eta": None,
        "expires": None,
        "utc": True,
    }
    with Connection(client.conf.broker_url) as conn:
        Producer(conn).publish(
            body, routing_key=worker.queue, serializer="json", correlation_id=tid, headers={}
        )
    result = client.AsyncResult(tid).get(timeout=30)
    assert result["path"] == f"p1/{tid}.bin" and result["size"] == 5000
    _check_file(worker, result, 5000, "proto1")


@pytest.mark.parametrize("protocol", [2, 1])
def test_celery_node_submits_in_both_protocols(redis_server, worker, origin, protocol):
    broker, backend = _urls(redis_server)
    secret = f"node-secret-{uuid.uuid4().hex}"
    url = f"{origin.url}/bytes/40000?seed=node{protocol}&token={secret}&page=2#part"
    seen = celery_node(
        broker,
        backend,
        worker.queue,
        protocol,
        url=url,
        headers={"Authorization": f"Bearer {secret}"},
    )
    assert seen["status"] == "SUCCESS", seen
    result = seen["result"]
    assert set(result) == set(RESULT_KEYS)
    shown = url.replace(secret, "***")
    assert result["url"] == shown and result["final_url"] == shown
    _check_file(worker, result, 40000, f"node{protocol}")
    # The request itself carried both secrets; no log line of the worker did.
    logged = [r for r in origin.stats.requests if r.query.get("token") == secret]
    assert any(r.headers.get("Authorization") == f"Bearer {secret}" for r in logged)
    wait_for(lambda: seen["id"] in worker.log(), 10, "the worker to log the task")
    assert secret not in worker.log()


@pytest.mark.parametrize("protocol", [2, 1])
def test_celery_node_hears_why_a_download_failed(redis_server, worker, origin, protocol):
    broker, backend = _urls(redis_server)
    seen = celery_node(
        broker, backend, worker.queue, protocol, url=f"{origin.url}/bytes/10", colour="blue"
    )
    assert seen["status"] == "FAILURE"
    assert seen["result"]["exc_type"] == "PermanentError"
    assert "unknown argument 'colour'" in seen["result"]["exc_message"][0]


def test_producers_of_their_own_send_to_a_known_groups_queue(
    redis_server, client, worker, origin, key
):
    """A group the client has made known: a bare Celery app and celery-node send to
    `<queue>.group-<name>` with the group as an argument, as the contract says, and the worker
    runs them."""
    group = f"ext-{key[:8]}"
    first = submit(client, f"{origin.url}/bytes/100?seed={key}", dest=f"g/{key}-0.bin",
                   queue=worker.queue, group=group)  # fmt: skip
    first.get(timeout=60)
    broker, backend = _urls(redis_server)
    queue = group_queue(worker.queue, group)
    bare = bare_producer(broker, backend, queue, url=f"{origin.url}/bytes/700?seed={key}",
                         dest=f"g/{key}-bare.bin", group=group)  # fmt: skip
    assert bare["states"][-1] == "SUCCESS", bare
    _check_file(worker, bare["result"], 700, key)
    node = celery_node(broker, backend, queue, 2, url=f"{origin.url}/bytes/900?seed={key}",
                       dest=f"g/{key}-node.bin", group=group)  # fmt: skip
    assert node["status"] == "SUCCESS", node
    _check_file(worker, node["result"], 900, key)
