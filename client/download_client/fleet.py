"""What the workers say about themselves (Celery's remote control): who is online, what runs,
what waits (queued, parked for a slot at its origin, waiting for a busy destination), what waits
to retry, and whether anyone consumes a queue."""

from __future__ import annotations

import ast
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from celery import Celery

from download_client import records
from download_client.client import backend_redis, read_states
from download_client.contract import TASK_NAME, WAITING
from download_client.groups import DEFAULT_GROUP, KNOWN_GROUPS, split_group
from download_client.lanes import LANES, home_queue, lane
from download_client.tables import retry_of

INSPECT_TIMEOUT = 1.0  # seconds to wait for the workers' replies


def queue_depth(conn: Any, queue: str, group_queues: Iterable[str] = ()) -> int:
    """Messages waiting in `queue`, its lanes and the group queues given, on Redis or RabbitMQ;
    a queue not declared yet holds none."""
    home = home_queue(queue)
    names = (home, *(lane(home, w) for w in LANES), *group_queues)
    return sum(messages_in(conn, name) for name in names)


def group_queues(app: Celery, queue: str) -> dict[str, str]:
    """The known groups of `queue` (download_client/groups.py), each with its group queue."""
    client = backend_redis(app)
    known = client.smembers(KNOWN_GROUPS) if client is not None else set()
    out = {}
    for raw in known:
        name = raw.decode() if isinstance(raw, bytes) else raw
        served, group = split_group(name)
        if group != DEFAULT_GROUP and served == home_queue(queue):
            out[group] = name
    return dict(sorted(out.items()))


def groups(
    conn: Any,
    queue: str,
    known: dict[str, str],
    active: list[dict[str, Any]],
    parked: dict[str, int],
) -> dict[str, dict[str, int]]:
    """Per group: downloads queued (in its group queue; the default group's are in the queue
    itself and its lanes), parked (for an origin slot or its cap, fleet-wide)
    and running (among `active`)."""
    out = {DEFAULT_GROUP: {"queued": queue_depth(conn, queue)}}
    for group, name in known.items():
        out[group] = {"queued": messages_in(conn, name)}
    for group, figures in out.items():
        figures.update(parked=parked.get(group, 0), running=0)
    for d in active:
        kwargs = d["kwargs"] if isinstance(d["kwargs"], dict) else {}
        group = str(kwargs.get("group") or DEFAULT_GROUP)
        out.setdefault(group, {"queued": 0, "parked": parked.get(group, 0), "running": 0})
        out[group]["running"] += 1
    return out


def messages_in(conn: Any, queue: str) -> int:
    """Messages waiting in one queue (0 where it is not declared yet)."""
    # RabbitMQ closes a channel that asks for a queue it does not have: a channel of its own.
    try:
        with conn.channel() as channel:
            return int(channel.queue_declare(queue, passive=True).message_count)
    except conn.channel_errors:
        return 0


def consumers(app: Celery, queue: str | None) -> list[str]:
    """The workers online that consume `queue` (None: any queue); empty: nobody will run what
    waits there."""
    replies = app.control.inspect(timeout=INSPECT_TIMEOUT).active_queues() or {}
    return sorted(
        w
        for w, queues in replies.items()
        if queue is None or any(q.get("name") == queue for q in queues)
    )


def status(app: Celery, queue: str) -> dict[str, Any]:
    known = group_queues(app, queue)
    # The broadcast that waits out its timeout: every worker that answers `active` is online.
    active = app.control.inspect(timeout=INSPECT_TIMEOUT).active() or {}
    workers = sorted(active)
    downloads = [
        {"worker": w, "id": t["id"], "kwargs": kwargs_object(t.get("kwargs"))}
        for w, tasks in active.items()
        for t in tasks
        if t.get("name") == TASK_NAME
    ]
    states = read_states(app.backend, [d["id"] for d in downloads])
    for d in downloads:  # bytes and total from the result backend, as pollers see them
        state, info = states[d["id"]]
        d["progress"] = info if state == "PROGRESS" and isinstance(info, dict) else None
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        depth = queue_depth(conn, queue, known.values())
        client = backend_redis(app)
        parked = records.parked_by_group(client) if client is not None else {}
        shares = groups(conn, queue, known, downloads, parked)
        rates = records.bandwidth(client) if client is not None else {}
        volumes = records.disks(client) if client is not None else {}
    body = {"workers": workers, "queue": queue, "queue_depth": depth, "active": downloads,
            "groups": shares, "bandwidth": rates, "disks": volumes}  # fmt: skip
    held = scheduled(app, workers)
    return {
        **body,
        "waiting": waiting(app, depth, held),
        "retrying": retrying(app, held),
    }


def scheduled(app: Celery, workers: list[str]) -> dict[str, dict[str, Any]]:
    """Downloads a worker holds until their countdown ends (Celery's `scheduled`): retries and
    waits for a busy destination."""
    held: dict[str, dict[str, Any]] = {}
    if workers:  # only those that answered: the reply comes as soon as they all have
        inspect = app.control.inspect(workers, timeout=INSPECT_TIMEOUT, limit=len(workers))
        for worker, entries in (inspect.scheduled() or {}).items():
            for entry in entries:
                request = entry.get("request") or {}
                if request.get("name") == TASK_NAME:
                    held[request["id"]] = {"worker": worker, "eta": _epoch(entry.get("eta"))}
    return held


def waiting(app: Celery, queued: int, held: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What waits without a worker process, by reason: `queued` (in the queue), `origin`
    (parked for a slot at its origin; `origins` per origin) and `destination` (waiting for a
    busy destination, held until its countdown ends; `destinations`: id, worker, dest)."""
    client = backend_redis(app)
    origins = records.parked(client) if client is not None else {}
    states = read_states(app.backend, sorted(held))
    busy = [
        {"id": task_id, "worker": held[task_id]["worker"], "dest": info.get("dest")}
        for task_id, (state, info) in states.items()
        if state == WAITING and isinstance(info, dict)
    ]
    return {
        "queued": queued,
        "origin": sum(origins.values()),
        "destination": len(busy),
        "origins": origins,
        "destinations": busy,
    }


def retrying(app: Celery, held: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Downloads between two attempts: held by a worker until their countdown ends or noted by
    a worker in Redis; why and when, from the note where there is one, else from the RETRY
    state's exception and the message's ETA. A wait for a busy destination is not a retry."""
    client = backend_redis(app)
    noted = records.retrying_ids(client) if client is not None else []
    ids = sorted(set(held) | set(noted))
    notes = records.retry_notes(client, ids) if client is not None else {}
    states = read_states(app.backend, ids)
    out = []
    for task_id in ids:
        state, info = states[task_id]
        if state == WAITING or (task_id not in held and state != "RETRY"):
            continue  # a wait, or a note outliving its retry: the download has moved on
        retry = retry_of(info, notes.get(task_id))
        if retry["due"] is None and task_id in held:
            retry["due"] = held[task_id]["eta"]
        out.append({"id": task_id, "worker": held.get(task_id, {}).get("worker"), **retry})
    return out


def _epoch(eta: Any) -> float | None:
    try:
        return datetime.fromisoformat(eta).timestamp() if isinstance(eta, str) else None
    except ValueError:
        return None


def kwargs_object(shown: Any) -> Any:
    """The kwargs `inspect active` reports as the worker's redacted repr, as a JSON object (a
    Python literal, read without evaluating anything); the text itself if it is not one."""
    if not isinstance(shown, str):
        return shown
    try:
        value = ast.literal_eval(shown)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return shown
    return value if isinstance(value, dict) else shown
