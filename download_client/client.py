"""Submitting downloads from Python and waiting for them. Only the task's name travels: this is
what any service does with a plain Celery client, plus redaction and progress polling."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from celery import Celery
from celery.result import AsyncResult

from download_client.brokers import rabbitmq_config
from download_client.contract import TASK_NAME
from download_client.redact import add_secret_params, redact_kwargs
from download_client.settings import Settings

DONE_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
ProgressHook = Callable[[AsyncResult, str, Any], None]


def connect(settings: Settings | None = None) -> Celery:
    """A producer app for the configured broker and backend; it imports none of the tasks."""
    s = settings or Settings.from_env()
    add_secret_params(s.redact_params)
    app = Celery("downloads-client", broker=s.broker_url, backend=s.result_backend)
    app.conf.update(
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        task_send_sent_event=True,  # read on the producer side: Flower sees the task as sent
        broker_transport_options={"visibility_timeout": s.visibility_timeout},
        result_backend_transport_options={"visibility_timeout": s.visibility_timeout},
        broker_connection_retry=False,
        broker_connection_max_retries=1,
    )
    app.conf.update(rabbitmq_config(s))  # declare the queues as the workers do
    return app


def submit(
    app: Celery,
    url: str,
    dest: str | None = None,
    sha256: str | None = None,
    headers: Mapping[str, str] | None = None,
    max_bytes: int | None = None,
    queue: str | None = None,
) -> AsyncResult:
    """Queue one download; the returned AsyncResult's id is the download's id."""
    kwargs: dict[str, Any] = {"url": url}
    for name, value in (("dest", dest), ("sha256", sha256), ("max_bytes", max_bytes)):
        if value is not None:
            kwargs[name] = value
    if headers:
        kwargs["headers"] = dict(headers)
    return app.send_task(
        TASK_NAME,
        kwargs=kwargs,
        queue=queue,
        argsrepr="()",
        kwargsrepr=repr(redact_kwargs(kwargs)),  # what task-sent events (Flower) may show
    )


def submit_many(
    app: Celery, items: Iterable[str | Mapping[str, Any]], **common: Any
) -> list[AsyncResult]:
    """Queue many downloads: each item is a URL or a dict of the task's arguments."""
    results = []
    for item in items:
        args = {"url": item} if isinstance(item, str) else dict(item)
        results.append(submit(app, **{**common, **args}))
    return results


def wait(
    results: Iterable[AsyncResult],
    timeout: float | None = None,
    on_update: ProgressHook | None = None,
    interval: float = 0.2,
) -> dict[str, AsyncResult]:
    """Poll until every result is done (or `timeout` passes); call `on_update(result, state,
    info)` whenever a state or PROGRESS figure changes. One failure never hides the others:
    return every result by id, done or not."""
    pending = {r.id: r for r in results}
    everything = dict(pending)
    seen: dict[str, tuple[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        for rid, result in list(pending.items()):
            state, info = _read(result)
            if on_update is not None and seen.get(rid) != (state, _hashable(info)):
                on_update(result, state, info)
            seen[rid] = (state, _hashable(info))
            if state in DONE_STATES:
                del pending[rid]
        if not pending or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(interval)
    return everything


def _read(result: AsyncResult) -> tuple[str, Any]:
    """State and info from one backend read: two reads can straddle a change (PROGRESS, then
    the final result as if it were progress figures)."""
    meta = result.backend.get_task_meta(result.id)
    return meta["status"], meta.get("result")


def _hashable(info: Any) -> Any:
    return repr(info)


RUNNING_STATES = frozenset({"RECEIVED", "STARTED", "PROGRESS", "RETRY"})


class BatchProgress:
    """The combined view of a batch, fed by `wait(..., on_update=batch.update)`: how many
    succeeded, failed, run and wait, and the bytes received so far (one failure never hides
    the rest)."""

    def __init__(self, results: Iterable[AsyncResult]) -> None:
        self.states: dict[str, str] = {r.id: "PENDING" for r in results}
        self.bytes: dict[str, int] = {}

    def update(self, result: AsyncResult, state: str, info: Any) -> None:
        self.states[result.id] = state
        if state == "PROGRESS" and isinstance(info, dict):
            self.bytes[result.id] = int(info.get("bytes") or 0)
        elif state == "SUCCESS" and isinstance(info, dict):
            self.bytes[result.id] = int(info.get("size") or 0)

    def summary(self) -> dict[str, int]:
        states = list(self.states.values())
        return {
            "total": len(states),
            "succeeded": states.count("SUCCESS"),
            "failed": sum(s in ("FAILURE", "REVOKED") for s in states),
            "running": sum(s in RUNNING_STATES for s in states),
            "waiting": sum(s not in DONE_STATES and s not in RUNNING_STATES for s in states),
            "bytes": sum(self.bytes.values()),
        }
