"""A worker consumes the group queues of the queues it serves (download_client/groups.py):
those known in Redis when its consumer starts, each new one as soon as a client announces it
(a remote control command, Celery's documented way to extend the worker's control), and any it
missed (announced while it was away) within GROUPS_REFRESH_S. Queues are added as Celery's own
`add_consumer` adds them, in the consumer's event loop (`call_soon`)."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.worker.control import control_command

from download_client.groups import CONSUME_COMMAND, KNOWN_GROUPS, is_group_queue, split_group
from download_client.lanes import is_lane
from download_client.settings import Settings
from tasks.deliveries import REDIS_ERRORS

GROUPS_REFRESH_S = 10.0

log = logging.getLogger(__name__)


def connect(app: Celery, settings: Settings) -> None:
    app.steps["consumer"].add(GroupQueues)


@control_command(name=CONSUME_COMMAND, args=[("queue", str)], signature="<queue>")
def consume_group(state: Any, queue: str) -> dict[str, str]:
    """A client announced a group queue: consume it if it is a group of a queue served here."""
    consumer = state.consumer
    if is_group_queue(queue) and split_group(queue)[0] in served(consumer):
        consumer.call_soon(consume, consumer, queue)
        return {"ok": f"consuming {queue}"}
    return {"ok": f"not serving {split_group(queue)[0]}"}


def served(consumer: Any) -> set[str]:
    """The queues this worker serves: those it consumes that are neither lanes nor groups."""
    names = consumer.app.amqp.queues.consume_from
    return {n for n in names if not is_lane(n) and not is_group_queue(n)}


def consume(consumer: Any, queue: str) -> None:
    """Runs in the consumer's event loop."""
    if consumer.task_consumer is None or consumer.task_consumer.consuming_from(queue):
        return
    consumer.app.amqp.queues[queue]  # created as a missing queue is: like the queue it serves
    consumer.add_task_queue(queue)


class GroupQueues(bootsteps.StartStopStep):  # type: ignore[misc]
    """While the consumer runs, a thread reads the known group queues from Redis (now, then
    every GROUPS_REFRESH_S) and has the event loop consume those of the queues served here.
    Reading in a thread keeps a Redis outage from stalling the loop."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        self.stop_event: threading.Event | None = None

    def start(self, c: Any) -> None:
        self.stop_event = threading.Event()
        threading.Thread(target=self._refresh, args=(c, self.stop_event), daemon=True).start()

    def stop(self, c: Any) -> None:
        if self.stop_event is not None:
            self.stop_event.set()

    def _refresh(self, c: Any, stop: threading.Event) -> None:
        client = c.app.backend.client
        while True:
            try:
                known = {_text(n) for n in client.smembers(KNOWN_GROUPS)}
            except REDIS_ERRORS as exc:
                log.warning("group queues not read (%s); trying again", exc)
                known = set()
            homes = served(c)
            for name in sorted(known):
                if is_group_queue(name) and split_group(name)[0] in homes:
                    c.call_soon(consume, c, name)
            if stop.wait(GROUPS_REFRESH_S):
                return


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
