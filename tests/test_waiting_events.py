"""How an event monitor (Flower's `celery.events.state`, fed real event dicts in-process) shows a
download that waits and runs, whatever order the events arrive in: the worker's main process
buffers its events (task-received, and task-started for tasks that are not downloads), while a
task's child sends at once (task-waiting, task-progress)."""

from __future__ import annotations

import itertools
import json
import time
import uuid
from typing import Any

import pytest
from celery import states
from celery.events.state import State

from download_client.contract import WAITING
from worker.celery_app import rank_running_and_waiting

rank_running_and_waiting()


class Monitor:
    def __init__(self) -> None:
        self.state, self.id, self.clock = State(), str(uuid.uuid4()), itertools.count()
        self.now = time.time()

    def send(self, kind: str, **fields: Any) -> str:
        n = next(self.clock)
        at = self.now + n
        event = {"type": kind, "uuid": self.id, "hostname": "celery@test", "clock": n}
        self.state.event({**event, "timestamp": at, "local_received": at, **fields})
        return str(self.state.tasks[self.id].state)


WAITING_FIELDS = {"reason": "origin", "since": 1.0, "waiting_for": "http://o:1"}


@pytest.mark.parametrize(
    "order",
    list(itertools.permutations(["task-received", "task-started", "task-waiting"])),
)
def test_a_parked_run_shows_waiting_in_any_order(order: tuple[str, ...]) -> None:
    m = Monitor()
    for kind in order:
        m.send(kind, **(WAITING_FIELDS if kind == "task-waiting" else {}))
    task = m.state.tasks[m.id]
    assert task.state == WAITING
    assert (task.reason, task.waiting_for) == ("origin", "http://o:1")


def test_a_run_after_a_wait_shows_running_and_a_stale_start_changes_nothing() -> None:
    m = Monitor()
    m.send("task-received")
    m.send("task-waiting", **WAITING_FIELDS)
    assert m.send("task-received") == WAITING  # the message published again
    assert m.send("task-progress", bytes=0, total=None) == "PROGRESS"
    assert m.send("task-started") == "PROGRESS"  # an earlier run's, buffered
    assert m.send("task-received") == "PROGRESS"
    assert m.send("task-succeeded", result="{}") == states.SUCCESS
    assert m.send("task-progress", bytes=5, total=None) == states.SUCCESS


def test_running_then_waiting_again_then_running_follows_the_child() -> None:
    """A redirect to a full origin, or a busy destination: the child's events keep their order."""
    m = Monitor()
    assert m.send("task-progress", bytes=0, total=None) == "PROGRESS"
    assert m.send("task-waiting", reason="destination", since=1.0, waiting_for="a/b") == WAITING
    assert m.state.tasks[m.id].waiting_for == "a/b"
    assert m.send("task-progress", bytes=0, total=None) == "PROGRESS"
    assert m.send("task-waiting", **WAITING_FIELDS) == WAITING


def test_a_fault_retry_is_still_retry_and_the_next_run_replaces_it() -> None:
    m = Monitor()
    m.send("task-progress", bytes=0, total=None)
    assert m.send("task-retried", exception="TransientError('x')") == states.RETRY
    assert m.send("task-received") == states.RECEIVED
    assert m.send("task-waiting", **WAITING_FIELDS) == WAITING
    assert m.send("task-progress", bytes=0, total=None) == "PROGRESS"


def test_revoked_while_waiting_stays_revoked() -> None:
    m = Monitor()
    m.send("task-waiting", **WAITING_FIELDS)
    assert m.send("task-revoked") == states.REVOKED
    assert m.send("task-waiting", **WAITING_FIELDS) == states.REVOKED
    assert m.send("task-progress", bytes=0, total=None) == states.REVOKED


def test_the_waiting_event_carries_a_line_for_flower() -> None:
    from tasks import waiting

    meta = waiting.for_origin("http://o:1")
    line = json.loads(json.dumps({"waiting": waiting.text(meta), **meta}))
    assert line["waiting"] == "waiting for a slot at http://o:1"
    assert waiting.text(waiting.for_destination("a/b")) == (
        "waiting for a/b, which another download is writing"
    )


def test_the_main_process_sends_task_started_only_for_a_first_run() -> None:
    from tasks.messages import waited

    assert not waited({"download_waits": 0, "download_waited_s": 0.0, "download_faults": 2})
    assert waited({"download_waits": 1}) and waited({"download_waited_s": 0.25})
    assert waited({"headers": {"download_waited_s": "1.5"}}) and not waited({"headers": None})
