"""The worker's Redis transport against a real Redis: closing a channel whose connection was
already released (what Celery does when Redis dies under unacknowledged messages) raises the
connection error Celery recovers from, where kombu's own transport raises AttributeError and
the worker exits."""

from __future__ import annotations

import pytest
import redis
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis

from worker.redis_transport import Transport


def _close_after_release(redis_server, transport) -> None:
    conn = Connection(f"{redis_server.url}/5", transport=transport)
    channel = conn.default_channel
    queue = Queue("transport-test", Exchange("transport-test"), "transport-test")
    with conn.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key="transport-test",
                         declare=[queue])  # fmt: skip
    message = channel.basic_get("transport-test", no_ack=False)
    assert message is not None  # one delivered, unacknowledged message to restore on close
    conn._do_close_transport()  # the release that comes first when the connection is lost
    conn.maybe_close_channel(channel)


def test_a_channel_closed_after_its_connection_is_released_raises_no_attribute_error(
    redis_server,
):
    _close_after_release(redis_server, Transport)  # nothing escapes


def test_kombus_own_transport_fails_there(redis_server):
    with pytest.raises(AttributeError, match="hostname"):
        _close_after_release(redis_server, kombu_redis.Transport)


def _publish_after_close(redis_server, transport) -> None:
    conn = Connection(f"{redis_server.url}/5", transport=transport)
    channel = conn.default_channel
    channel.close()  # as when the broker connection was lost under a producer that publishes
    message = channel.prepare_message("{}", content_type="application/json")
    channel.basic_publish(message, exchange="", routing_key="transport-test")


def test_a_publish_through_a_closed_channel_raises_the_connection_error(redis_server):
    """What a retry sent from a child while Redis comes back met: Celery then gave up on the
    re-send and recorded FAILURE; a connection error is retried on a new connection."""
    with pytest.raises(redis.ConnectionError, match="already closed"):
        _publish_after_close(redis_server, Transport)


def test_kombus_own_transport_raises_attribute_error_there(redis_server):
    with pytest.raises(AttributeError, match="client"):
        _publish_after_close(redis_server, kombu_redis.Transport)


def test_the_worker_app_uses_it_for_redis_urls_which_keep_their_scheme():
    from kombu.transport import resolve_transport

    from worker import app

    conn = app.connection()
    assert conn.transport_cls in ("redis", "rediss")  # Flower reads the scheme
    assert resolve_transport("redis") is Transport
    assert conn.as_uri().startswith("redis://")
