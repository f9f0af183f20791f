"""A worker consumes the group queues of the queues it serves (download_client/groups.py):
those known in Redis when it starts (added in `celeryd_after_setup`, as the lanes are, so Celery
declares them and binds them for native delayed delivery on RabbitMQ), each new one as soon as a
client announces it (a remote control command, Celery's documented way to extend the worker's
control), and any it missed within GROUPS_REFRESH_S. A queue added while the worker runs is added
as Celery's own `add_consumer` adds one, in the consumer's event loop (`call_soon`), and bound for
native delayed delivery with kombu's own function, as Celery binds its queues at start: else a
countdown (a retry, a wait) sent through the delay queues would never reach it."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, bootsteps
from celery.signals import celeryd_after_setup
from celery.worker.control import control_command
from kombu.transport.native_delayed_delivery import (
    bind_queue_to_native_delayed_delivery_exchange,
)

from download_client.groups import CONSUME_COMMAND, KNOWN_GROUPS, is_group_queue, split_group
from download_client.lanes import is_lane
from download_client.settings import Settings
from tasks.deliveries import REDIS_ERRORS

GROUPS_REFRESH_S = 10.0

log = logging.getLogger(__name__)


def connect(app: Celery, settings: Settings) -> None:
    # After the lanes' hook (worker/lanes.py), which sets the selection this adds to.
    celeryd_after_setup.connect(consume_known, weak=False, dispatch_uid="downloads-groups")
    app.steps["consumer"].add(GroupQueues)


def consume_known(sender: Any = None, instance: Any = None, **_: Any) -> None:
    app = instance.app
    queues = app.amqp.queues
    homes = {n for n in queues.consume_from if not is_lane(n) and not is_group_queue(n)}
    for name in sorted(_known(app.backend.client)):
        if is_group_queue(name) and split_group(name)[0] in homes:
            queues.select_add(queues[name])


def _known(client: Any) -> set[str]:
    try:
        return {_text(n) for n in client.smembers(KNOWN_GROUPS)}
    except REDIS_ERRORS as exc:  # the refresh finds them once Redis answers
        log.warning("group queues not read (%s); trying again", exc)
        return set()


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
    names = list(consumer.app.amqp.queues.consume_from)  # a copy: the loop may add to it
    return {n for n in names if not is_lane(n) and not is_group_queue(n)}


def consume(consumer: Any, queue: str) -> None:
    """Runs in the consumer's event loop."""
    if consumer.task_consumer is None or consumer.task_consumer.consuming_from(queue):
        return
    declared = consumer.app.amqp.queues[queue]  # created as a missing queue is: like its queue
    consumer.add_task_queue(queue)
    if (declared.queue_arguments or {}).get("x-queue-type") == "quorum":
        # Celery binds its queues for native delayed delivery when quorum queues are in use
        # (celery.worker.consumer.delayed_delivery); a queue added later must be bound too.
        try:
            with consumer.app.connection_for_write() as conn:
                bind_queue_to_native_delayed_delivery_exchange(conn, declared)
        except Exception:  # its countdowns would be lost: say so loudly
            log.exception("%s not bound for native delayed delivery", queue)


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
                homes = served(c)
                for name in sorted(_known(client)):
                    if is_group_queue(name) and split_group(name)[0] in homes:
                        c.call_soon(consume, c, name)
            except Exception:  # the refresh must outlive one bad pass
                log.exception("group queues not refreshed; trying again")
            if stop.wait(GROUPS_REFRESH_S):
                return


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
