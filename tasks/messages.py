"""What the worker does with a message before the task runs: the gate that refuses what cannot be
a download, and the redacted view of a task that events, `inspect` and Flower show (without the
main process's `task-started` for a download that waited before: the run says when it runs)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from celery import Task
from celery.exceptions import InvalidTaskError
from celery.worker.request import Request
from celery.worker.strategy import default as default_strategy

from download_client.redact import redact_reprs


class RedactedRequest(Request):  # type: ignore[misc]
    """What the worker shows of a task (task-received events, `inspect active`, so Flower) has
    header values and URL tokens masked, whatever the producer put in argsrepr/kwargsrepr. The
    request dict gets the same: the task's context (log records' extra data) is built from it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.redacted = redact_reprs(self.args, self.kwargs)
        self.request_dict["argsrepr"], self.request_dict["kwargsrepr"] = self.redacted

    @property
    def argsrepr(self) -> str:
        return self.redacted[0]

    @property
    def kwargsrepr(self) -> str:
        return self.redacted[1]

    def send_event(self, type: str, **fields: Any) -> None:
        """Every event but the `task-started` of a download that waited before. The main
        process sends it when a child accepts the message, before the run knows whether it will
        download or wait again, and its event buffer often delivers it after the child's own
        events: such a run says itself when it really runs (tasks/waiting.py). A first run's
        `task-started` stays (it costs the child nothing); WAITING outranks it, whatever the
        order the two arrive in (worker/celery_app.py)."""
        if type != "task-started" or not waited(self.request_dict):
            super().send_event(type, **fields)

    def info(self, safe: bool = False) -> dict[str, Any]:
        return {**super().info(safe=True), "args": self.argsrepr, "kwargs": self.kwargsrepr}

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: {self.humaninfo()} {self.argsrepr} {self.kwargsrepr}>"


def waited(headers: Mapping[str, Any]) -> bool:
    """Whether a download's message comes back from a wait (tasks/retries.py, Journey): for a
    busy destination (`download_waits`) or parked for a slot (`download_waited_s`)."""
    nested = headers.get("headers")
    seen = {**headers, **(nested if isinstance(nested, Mapping) else {})}
    try:
        return (
            int(seen.get("download_waits") or 0) > 0
            or float(seen.get("download_waited_s") or 0) > 0
        )
    except (TypeError, ValueError):
        return False


def checked_strategy(task: Task, app: Any, consumer: Any, **kwargs: Any) -> Any:
    """Celery's default strategy behind a gate. The consumer refuses pickle and the like, but
    passes `application/data` and `application/text` through undecoded, and a body of another
    shape raises inside the strategy: either one stops the whole worker ("Unrecoverable error"),
    and the message, never acked, is restored to stop the next one. Here such a message is an
    InvalidTaskError, which the worker's consumer logs without its content and discards
    (worker/refusals.py). Both task protocols pass: 2 (`[args, kwargs, embed]`, what Celery 4+
    sends) and 1 (`{"task", "id", "args", "kwargs"}`, what celery-node, gocelery and older
    producers send), which Celery's strategy turns into protocol 2."""
    handler = default_strategy(task, app, consumer, **kwargs)

    def gate(message: Any, body: Any, *args: Any, **kw: Any) -> Any:
        if message.content_type != "application/json":
            raise InvalidTaskError(
                f"refused a message of content type {message.content_type!r}: only JSON"
            )
        headers = message.headers
        protocol = 2 if isinstance(headers, dict) and "task" in headers else 1
        problem = shape_problem(message.payload, protocol)
        if problem is not None:
            raise InvalidTaskError(f"refused a message whose body {problem}")
        return handler(message, body, *args, **kw)

    return gate


def shape_problem(payload: Any, protocol: int) -> str | None:
    """Why a decoded body is not a task message of protocol 2 or 1, or None when it is one.
    With protocol 2's headers a dict body must still carry `args` (Celery's hybrid of the two):
    without it Celery would read the dict as `[args, kwargs, embed]` in the child."""
    if isinstance(payload, list | tuple):
        if (
            len(payload) == 3
            and isinstance(payload[0], list | tuple)
            and isinstance(payload[1], dict)
            and isinstance(payload[2], dict)
        ):
            return None
        return "is not [args, kwargs, embed] (protocol 2)"
    if isinstance(payload, dict):
        if protocol == 2 and "args" not in payload:
            return "is an object without args under protocol 2 headers"
        if not isinstance(payload.get("args", ()), list | tuple):
            return "has args that are not a list (protocol 1)"
        if not isinstance(payload.get("kwargs", {}), dict):
            return "has kwargs that are not an object (protocol 1)"
        return None
    return f"is a {type(payload).__name__}, not a task message of protocol 2 or 1"
