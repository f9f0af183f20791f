"""The RabbitMQ part of the Celery configuration, without a broker."""

from __future__ import annotations

import pytest
from kombu.transport.native_delayed_delivery import calculate_routing_key

from download_client.brokers import back_to_its_queue, rabbitmq_config, whole_seconds
from download_client.settings import Settings


def _settings(url: str) -> Settings:
    return Settings.from_env({"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": "redis://h/1"})


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://h:6380/0"])
def test_redis_brokers_get_nothing_extra(url):
    assert rabbitmq_config(_settings(url)) == {}


@pytest.mark.parametrize("url", ["amqp://u:p@h:5672//", "amqps://h//", "pyamqp://h//"])
def test_rabbitmq_gets_quorum_queues_on_topic_exchanges(url):
    conf = rabbitmq_config(_settings(url))
    assert conf["task_default_queue_type"] == conf["task_create_missing_queue_type"] == "quorum"
    assert conf["task_default_exchange_type"] == "topic"
    assert conf["task_create_missing_queue_exchange_type"] == "topic"
    assert conf["broker_native_delayed_delivery_queue_type"] == "quorum"


def test_a_retry_is_routed_back_to_its_queue():
    delayed = calculate_routing_key(7, "downloads.bulk")
    assert back_to_its_queue("t", (), {}, {"routing_key": delayed}) == {"queue": "downloads.bulk"}
    assert back_to_its_queue("t", (), {}, {"routing_key": "bulk"}) == {"queue": "bulk"}
    # A send that names its queue, or has no routing key yet, is left to Celery.
    assert back_to_its_queue("t", (), {}, {"queue": "q", "routing_key": "x"}) is None
    assert back_to_its_queue("t", (), {}, {}) is None


@pytest.mark.parametrize(("given", "sent"), [(0.05, 1.0), (1.0, 1.0), (2.2, 3.0), (None, None)])
def test_countdowns_are_whole_seconds_rounded_up(given, sent):
    assert whole_seconds(given) == sent
