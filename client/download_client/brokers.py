"""Celery settings that apply only when the broker is RabbitMQ. Workers and producers both need
them: a queue or exchange declared with other arguments than the broker already has is refused
(PRECONDITION_FAILED), so everyone who declares the download queues declares them alike."""

from __future__ import annotations

import math
from typing import Any

from download_client.lanes import without_delay
from download_client.settings import Settings


def is_rabbitmq(broker_url: str) -> bool:
    return broker_url.partition("://")[0] in ("amqp", "amqps", "pyamqp")


def rabbitmq_config(s: Settings) -> dict[str, Any]:
    """With RabbitMQ as broker: quorum queues (replicated), on topic exchanges so that Celery's
    native delayed delivery holds every countdown (retries, waits) in the broker. On a direct
    exchange a countdown message is held by a worker until it is due, and with quorum queues
    (static prefetch) it takes a download slot's place meanwhile."""
    if not is_rabbitmq(s.broker_url):
        return {}
    return {
        "task_default_queue_type": "quorum",
        "task_default_exchange_type": "topic",
        # Queues named with -Q or `--queue` are created on first use: the same kind.
        "task_create_missing_queue_type": "quorum",
        "task_create_missing_queue_exchange_type": "topic",
        "broker_native_delayed_delivery_queue_type": "quorum",
        "worker_detect_quorum_queues": True,
        "task_routes": (back_to_its_queue,),
        # A publish (a submission, a retry, a wait) returns once the broker has taken it.
        "broker_transport_options": {"confirm_publish": True},
    }


def back_to_its_queue(
    name: str, args: Any, kwargs: Any, options: dict[str, Any], **_: Any
) -> dict[str, str] | None:
    """A retry is re-sent with its delivery's exchange and routing key but no queue, and Celery's
    native delayed delivery then routes it by the default queue's key: a retry of a task from
    another queue would reach no queue at all and be dropped. Route it back to the queue it came
    from (for every queue declared here, the routing key is the queue's name)."""
    if options.get("queue") is not None or not options.get("routing_key"):
        return None
    return {"queue": without_delay(options["routing_key"])}


def whole_seconds(countdown: float | None) -> float | None:
    """Native delayed delivery counts whole seconds and refuses a delay below one second (a
    retry after 0.4 s would fail to be sent): round up, so a task never arrives before its ETA."""
    if countdown is None or countdown <= 0:
        return countdown
    return float(math.ceil(countdown))
