"""The window of kombu#305, reproduced deterministically: a worker's channel takes a message off
the queue, Redis answers, and then Redis hears nothing more from anyone (a proxy in between
stops forwarding) until it is SIGKILLed and started again from its AOF (`appendfsync always`).
With kombu's own Redis transport the message is gone: off the queue, and never recorded as
unacknowledged. With the worker's transport the take and its record are one step: the message
is in the unacknowledged hash, and once its holder's lease lapses it is delivered again."""

from __future__ import annotations

import contextlib
import json
import threading
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from tests.freezing_proxy import FreezingProxy
from tests.harness import RedisServer, wait_for
from worker import redis_transport

QUEUE = "window"


@pytest.fixture
def crashable(tmp_path):
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    yield server
    server.stop()


def _take_through_a_freeze(server: RedisServer, transport: type, trigger: bytes) -> str:
    """Publish one message, consume it through a proxy that freezes right after the take, crash
    Redis, start it again. Returns the message's delivery tag."""
    queue = Queue(QUEUE, Exchange(QUEUE), QUEUE)
    with Connection(f"{server.url}/0") as direct, direct.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=QUEUE, declare=[queue])
    raw = json.loads(redis.Redis(port=server.port).lindex(QUEUE, 0) or b"{}")
    tag: str = raw["properties"]["delivery_tag"]

    proxy = FreezingProxy(server.port, trigger)
    consumer = Connection(f"{proxy.url}/0", transport=transport)
    seen: list[Any] = []

    def consume() -> None:
        # The crash under it ends this consumer, with whichever error.
        with (
            contextlib.suppress(Exception),
            consumer.Consumer(queue, callbacks=[lambda body, m: seen.append(body)]),
        ):
            consumer.drain_events(timeout=10)

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    try:
        assert proxy.replied.wait(10), "the take never went through the proxy"
        server.kill()  # the worker's next command has not reached Redis: the window
    finally:
        proxy.close()
        thread.join(15)
    server.start()
    assert not seen  # the record comes before the callbacks: nothing ran
    return tag


def test_kombus_own_transport_loses_a_message_taken_just_before_a_crash(crashable):
    tag = _take_through_a_freeze(crashable, kombu_redis.Transport, b"BRPOP")
    r = redis.Redis(port=crashable.port)
    assert r.llen(QUEUE) == 0 and not r.hexists("unacked", tag)  # lost for good


def test_the_workers_transport_keeps_it_and_delivers_it_again(crashable):
    tag = _take_through_a_freeze(crashable, redis_transport.Transport, b"EVAL")
    r = redis.Redis(port=crashable.port)
    assert r.hexists("unacked", tag) and r.zscore("unacked_index", tag)
    options = {"fetch_lease": 1}
    with Connection(f"{crashable.url}/0", transport=redis_transport.Transport,
                    transport_options=options) as conn:  # fmt: skip
        qos = conn.default_channel.qos
        wait_for(lambda: qos.restore_visible(num=None, interval=1) or r.llen(QUEUE), 30,
                 "the lapsed holding to be put back")  # fmt: skip
        message = conn.default_channel.basic_get(QUEUE, no_ack=True)
    assert message is not None and message.delivery_tag == tag and message.payload == {"n": 1}
