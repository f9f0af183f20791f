"""Submitting downloads from Python and waiting for them. Only the task's name travels: this is
what any service does with a plain Celery client, plus redaction, a record of each submitted id
(download_client.records) and progress polling."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from amqp.exceptions import MessageNacked  # type: ignore[import-untyped]
from celery import Celery
from celery.result import AsyncResult

from download_client import records
from download_client.arguments import deadline_from
from download_client.brokers import rabbitmq_config
from download_client.contract import TASK_NAME, WAITING
from download_client.groups import (
    CONSUME_COMMAND,
    KNOWN_GROUPS,
    check_group,
    group_queue,
    is_group_queue,
    split_group,
)
from download_client.lanes import is_lane, urgent_lane
from download_client.redact import add_secret_params, redact_kwargs
from download_client.settings import Settings

DONE_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
ProgressHook = Callable[[AsyncResult, str, Any], None]
# Messages published per Redis round trip when submitting many (with one round trip more for
# their records): big enough to amortise the round trips, small enough to keep memory flat.
CHUNK = 1000
NACK_TRIES = 6  # about a second in all


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
        result_expires=s.result_expires,  # how long a submission's record is kept, too
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
    deadline: float | str | None = None,
    urgent: bool = False,
    group: str | None = None,
    mirrors: Sequence[str] = (),
) -> AsyncResult:
    """Queue one download; the returned AsyncResult's id is the download's id. `deadline`:
    seconds from now, or an ISO 8601 time with a time zone (docs/contract.md). `urgent`: sent to
    the queue's express lane (download_client/lanes.py). `group`: the submitter group whose
    share of the fleet it takes (download_client/groups.py). `mirrors`: other URLs of the same
    bytes (with `sha256`)."""
    kwargs: dict[str, Any] = {"url": url}
    given = (("dest", dest), ("sha256", sha256), ("max_bytes", max_bytes), ("deadline", deadline),
             ("group", group))  # fmt: skip
    for name, value in given:
        if value is not None:
            kwargs[name] = value
    if headers:
        kwargs["headers"] = dict(headers)
    if mirrors:
        kwargs["mirrors"] = list(mirrors)
    [task_id] = [i for i, _ in submit_stream(app, [kwargs], queue=route(app, queue, urgent))]
    return AsyncResult(task_id, app=app)


def submit_many(
    app: Celery, items: Iterable[str | Mapping[str, Any]], **common: Any
) -> list[AsyncResult]:
    """Queue many downloads: each item is a URL or a dict of the task's arguments; `queue`,
    `urgent` and `group` as for `submit` (an item's own `group` wins)."""
    queue = route(app, common.pop("queue", None), bool(common.pop("urgent", False)))
    given = ({"url": i} if isinstance(i, str) else dict(i) for i in items)
    merged = ({**_present(common), **args} for args in given)
    return [AsyncResult(i, app=app) for i, _ in submit_stream(app, merged, queue=queue)]


def route(app: Celery, queue: str | None, urgent: bool) -> str | None:
    """The queue to send to: `queue` (None: the default), or its express lane when `urgent`."""
    return urgent_lane(queue or app.conf.task_default_queue) if urgent else queue


def _present(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def submit_stream(
    app: Celery,
    items: Iterable[Mapping[str, Any]],
    queue: str | None = None,
    announce: bool = True,
) -> Iterator[tuple[str, str]]:
    """Queue downloads (each a mapping of the task's keyword arguments) as they come, CHUNK at a
    time on one producer connection, and yield (id, redacted URL) for each once it is queued.
    Memory stays flat for any number of items. Per chunk: one round trip records the ids (when
    results live in Redis), then the messages go out pipelined. `announce`: also send Celery's
    task-sent event for each (Flower lists the download before a worker takes it); it costs a
    second publish per task."""
    chunk: list[Mapping[str, Any]] = []
    with app.producer_or_acquire() as producer:
        for kwargs in items:
            chunk.append(kwargs)
            if len(chunk) == CHUNK:
                yield from _publish_chunk(app, producer, chunk, queue, announce)
                chunk = []
        if chunk:
            yield from _publish_chunk(app, producer, chunk, queue, announce)


def _publish_chunk(
    app: Celery,
    producer: Any,
    chunk: Sequence[Mapping[str, Any]],
    queue: str | None,
    announce: bool,
) -> list[tuple[str, str]]:
    now = time.time()
    chunk = [deadline_from(k, now) for k in chunk]  # seconds count from now, not from a worker
    shown = [redact_kwargs(dict(k)) for k in chunk]  # what events (Flower) and the caller see
    sent = [(str(uuid.uuid4()), s["url"]) for s in shown]
    home = queue or app.conf.task_default_queue
    targets = _targets(home, chunk)
    # First: every queued id has its record, and every group queue its workers, never the other
    # way round.
    _record(app, sent, {t for t in targets if is_group_queue(t)})
    amqp = app.amqp
    routes: dict[str, dict[str, Any]] = {}
    with _pipelined(producer):
        for (task_id, _), kwargs, redacted, target in zip(sent, chunk, shown, targets, strict=True):
            route = routes.get(target)
            if route is None:
                route = routes[target] = amqp.router.route({"queue": target}, TASK_NAME, (), {},
                                                           None)  # fmt: skip
                # Declared once here (kombu then caches it for the connection), not at every
                # publish: the declaration's bookkeeping costs more than the publish itself.
                producer.maybe_declare(route["queue"])
            message = amqp.create_task_message(
                task_id,
                TASK_NAME,
                (),
                dict(kwargs),
                argsrepr="()",
                kwargsrepr=repr(redacted),
                create_sent_event=announce,
                reply_to=app.thread_oid,
            )
            _send(amqp, producer, message, route)
    return sent


def _send(amqp: Any, producer: Any, message: Any, route: dict[str, Any]) -> None:
    """Publish one message. A failed publish is reported, not retried (the caller knows which
    ids were queued), but for a nack: RabbitMQ nacks what reaches a quorum queue in the moment
    before its leader is elected (a group queue just declared), and takes it when sent again."""
    for attempt in range(NACK_TRIES):
        try:
            amqp.send_task_message(producer, TASK_NAME, message, declare=[], retry=False, **route)
            return
        except MessageNacked:
            if attempt == NACK_TRIES - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def _targets(queue: str, chunk: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each download's queue: its group's queue of `queue`, unless `queue` is an express lane
    (no group's). What `queue` is, is worked out once a chunk, not once a download."""
    urgent, base = is_lane(queue), split_group(queue)[0]
    out = []
    for kwargs in chunk:
        group = kwargs.get("group")
        if group is None or urgent:
            check_group(group)  # refused here, not only by the worker
            out.append(queue)
        else:
            out.append(group_queue(base, check_group(group)))
    return out


def _pipelined(producer: Any) -> AbstractContextManager[Any]:
    """kombu 5.7's `Producer.batch` sends a chunk's publishes in one round trip; older kombu
    (the client runs on Celery 5.6) publishes them one at a time, to the same effect."""
    batch = getattr(producer, "batch", None)
    return batch(max_size=2 * CHUNK) if batch is not None else nullcontext()


def _record(app: Celery, sent: Sequence[tuple[str, str]], group_queues: set[str]) -> None:
    client = backend_redis(app)
    if client is None:
        for name in group_queues:
            announce_group(app, name)
        return
    expires = app.conf.result_expires  # seconds, or a timedelta if someone set one
    ttl = int(expires.total_seconds() if hasattr(expires, "total_seconds") else expires)
    pipe = client.pipeline(transaction=False)
    for task_id, shown in sent:
        records.mark_submitted(pipe, task_id, shown, ttl)
    names = sorted(group_queues)
    for name in names:
        pipe.sadd(KNOWN_GROUPS, name)
    replies = pipe.execute()
    added = replies[len(replies) - len(names) :]  # SADD's replies, after the records'
    for name, new in zip(names, added, strict=True):
        if new:
            announce_group(app, name)


def announce_group(app: Celery, name: str) -> None:
    """Tell the workers online to consume a group queue (worker/groups.py); a worker that
    starts later reads it from Redis."""
    app.control.broadcast(CONSUME_COMMAND, arguments={"queue": name})


def backend_redis(app: Celery) -> Any:
    """The result backend's Redis client, or None when results live elsewhere."""
    return getattr(app.backend, "client", None)


def cancel(app: Celery, ids: Sequence[str], timeout: float = 1.0) -> list[str]:
    """Revoke `ids` on every worker online; a running one is terminated (the worker removes its
    partial, as for any revoke). Returns the hostnames of the workers that acknowledged: a
    revoke reaches only the workers running now."""
    replies = app.control.revoke(list(ids), terminate=True, reply=True, timeout=timeout) or []
    return sorted(name for reply in replies for name in reply)


def wait(
    results: Iterable[AsyncResult],
    timeout: float | None = None,
    on_update: ProgressHook | None = None,
    interval: float = 0.2,
    on_poll: Callable[[], None] | None = None,
) -> dict[str, AsyncResult]:
    """Poll until every result is done (or `timeout` passes); call `on_update(result, state,
    info)` whenever a state or PROGRESS figure changes, and `on_poll()` after each round of
    reads. One failure never hides the others: return every result by id, done or not."""
    pending = {r.id: r for r in results}
    everything = dict(pending)
    seen: dict[str, tuple[str, Any]] = {}
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        states = read_states(next(iter(pending.values())).backend, list(pending))
        for rid, (state, info) in states.items():
            result = pending[rid]
            if on_update is not None and seen.get(rid) != (state, _hashable(info)):
                on_update(result, state, info)
            seen[rid] = (state, _hashable(info))
            if state in DONE_STATES:
                del pending[rid]
        if on_poll is not None:
            on_poll()
        if not pending or (deadline is not None and time.monotonic() > deadline):
            break
        time.sleep(interval)
    return everything


def read_states(backend: Any, ids: Sequence[str]) -> dict[str, tuple[str, Any]]:
    """State and info of each id, each from one backend read (two reads could straddle a
    change: PROGRESS, then the final result read as if it were progress figures). A Redis
    backend is read CHUNK ids a round trip."""
    if not hasattr(backend, "mget") or not hasattr(backend, "get_key_for_task"):
        metas = {i: backend.get_task_meta(i) for i in ids}
        return {i: (m["status"], m.get("result")) for i, m in metas.items()}
    states: dict[str, tuple[str, Any]] = {}
    for start in range(0, len(ids), CHUNK):
        chunk = ids[start : start + CHUNK]
        raw = backend.mget([backend.get_key_for_task(i) for i in chunk])
        for task_id, value in zip(chunk, raw, strict=True):
            meta = backend.decode_result(value) if value else {"status": "PENDING"}
            states[task_id] = (meta["status"], meta.get("result"))
    return states


def _hashable(info: Any) -> Any:
    return repr(info)


RUNNING_STATES = frozenset({"RECEIVED", "STARTED", "PROGRESS", "RETRY"})


class BatchProgress:
    """The combined view of a batch, fed by `wait(..., on_update=batch.update)`: how many
    succeeded, failed, run, wait without a worker process (WAITING) and are still queued, and
    the bytes received so far (one failure never hides the rest)."""

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
            "waiting": states.count(WAITING),
            "queued": sum(
                s not in DONE_STATES and s not in RUNNING_STATES and s != WAITING for s in states
            ),
            "bytes": sum(self.bytes.values()),
        }
