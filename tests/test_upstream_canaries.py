"""Canaries: the upstream behaviour behind each private name the service uses, one test a name,
failing with the installed upstream's version in its message the day that code changes; and the
count that keeps those names behind three doors (worker/celery_internals.py,
worker/redis_transport.py, tasks/core/http.py). `make upstream` runs these against the newest
Celery, kombu and Flower of the same major version."""

from __future__ import annotations

import ast
import importlib
import inspect
import os
import re
import socket
import sys
import time
import uuid
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import celery
import kombu
import pytest
import urllib3
from celery import concurrency, states
from celery.backends.redis import RedisBackend
from celery.concurrency import asynpool, prefork
from celery.events.state import State
from kombu import Connection, Exchange, Queue
from kombu import transport as kombu_transport
from kombu.asynchronous import Hub
from kombu.transport import redis as kombu_redis
from urllib3.connection import HTTPConnection

from download_client.settings import Settings
from tests.harness import ROOT, worker_env
from worker import celery_internals, redis_transport
from worker.celery_app import create_app

CELERY = f"celery {celery.__version__}"
KOMBU = f"kombu {kombu.__version__}"
URLLIB3 = f"urllib3 {urllib3.__version__}"

# Each door and the upstream names it holds. A new private name goes behind one of these doors,
# with a comment naming the upstream code and a canary below.
DOORS = {
    "worker/celery_internals.py": {
        "_get_result_meta",
        "active_requests",
        "PRECEDENCE_LOOKUP",
        "_track_child_process",
        "_sentinel_poll",
    },
    "worker/redis_transport.py": {
        "TRANSPORT_ALIASES",
        "_transport_cache",
        "_delivered",
        "_connparams",
    },
    "tasks/core/http.py": {"_new_conn", "_dns_host"},
}
MAX_NAMES = 12
# The reliable fetch's own names (worker/redis_transport.py, FETCH_INTERNALS), allowed in the
# transport beside its names above and outside the cap; each has its canary, named here.
FETCH_CANARIES = {
    "_brpop_start": "test_kombu_starts_the_blocking_take_in_brpop_start",
    "_brpop_read": "test_kombu_reads_and_delivers_the_take_in_brpop_read",
    "_queue_cycle": "test_kombu_rotates_the_queues_in_queue_cycle",
    "_q_for_pri": "test_kombu_names_a_priority_step_key_with_q_for_pri",
    "_in_poll": "test_kombu_marks_the_take_connection_in_poll",
    "_brpop_sent_at": "test_kombu_times_the_take_for_its_health_check",
}
# Not an upstream library's: argparse's type for add_subparsers() (typeshed names it), in an
# annotation only; the standard library moves with the Python version, which CI pins.
STANDARD_LIBRARY = {"download_client/cli.py": {"_SubParsersAction"}}
PRODUCT = ("worker", "tasks", "download_client")
# Where each product package lives: the workers' at the top, the client's distribution in client/.
BASES = {"worker": ROOT, "tasks": ROOT, "download_client": ROOT / "client"}
UPSTREAM = (
    "celery",
    "kombu",
    "billiard",
    "flower",
    "prometheus_client",
    "urllib3",
    "requests",
    "redis",
    "vine",
    "amqp",
)
# Upstream globals that look public but that their library calls internal or never documents.
UNDOCUMENTED = {
    "TRANSPORT_ALIASES",
    "PRECEDENCE_LOOKUP",
    "NONE_PRECEDENCE",
    "active_requests",
    "reserved_requests",
}


@pytest.fixture
def app(redis_server, tmp_path):
    return create_app(Settings.from_env(worker_env(redis_server.url, tmp_path)))


# --- Celery (worker/celery_internals.py) ---


def test_celery_builds_the_stored_result_meta(app):
    """Backend._get_result_meta: the dict every key-value backend stores for a state."""
    assert isinstance(app.backend, RedisBackend), f"{CELERY}: the worker's backend is not Redis"
    try:
        meta = celery_internals.result_meta(app.backend, {"size": 1}, states.SUCCESS, None, None)
    except (AttributeError, TypeError) as exc:
        pytest.fail(f"{CELERY}: Backend._get_result_meta(result, state, traceback, request): {exc}")
    expected = {"status", "result", "traceback", "children", "date_done"}
    assert expected <= set(meta), f"{CELERY}: _get_result_meta's keys are now {sorted(meta)}"
    assert (meta["status"], meta["result"]) == ("SUCCESS", {"size": 1}), f"{CELERY}: {meta}"
    assert meta["date_done"], f"{CELERY}: _get_result_meta no longer dates a final state"


def test_celery_active_requests_holds_what_the_pool_runs():
    """celery.worker.state.active_requests: filled by task_accepted, emptied by task_ready."""
    from celery.worker import state

    class Running:
        id, name = str(uuid.uuid4()), "canary"

    request = Running()
    state.task_accepted(request)
    try:
        assert request in celery_internals.running_requests(), (
            f"{CELERY}: task_accepted no longer adds to celery.worker.state.active_requests"
        )
    finally:
        state.task_ready(request)
    assert request not in celery_internals.running_requests(), (
        f"{CELERY}: task_ready no longer removes from celery.worker.state.active_requests"
    )
    assert isinstance(state.active_requests, weakref.WeakSet), (
        f"{CELERY}: celery.worker.state.active_requests is now a {type(state.active_requests)}"
    )


def test_celery_prefork_watches_a_child_by_its_sentinel_poll_until_it_has_exited(app):
    """AsynPool._track_child_process hands a child's `_sentinel_poll` to the hub, and
    _untrack_child_process sets it to None once the child has exited. The stock method hands
    that None to the hub too (the ValueError that ends a worker whose consumer registers the
    pool again after a lost broker connection); the worker's pool leaves such a child alone.
    The day the stock method stops raising, the guard can go."""
    pool_cls = concurrency.get_implementation(app.conf.worker_pool)
    assert issubclass(pool_cls, prefork.TaskPool), f"{CELERY}: the worker's pool is {pool_cls}"
    hub, (read, write) = Hub(), os.pipe()
    child = SimpleNamespace(_sentinel_poll=read)
    ours, stock = object.__new__(pool_cls.Pool), object.__new__(asynpool.AsynPool)
    try:
        ours._track_child_process(child, hub)
        assert read in hub.readers, f"{CELERY}: _track_child_process no longer watches it"
        ours._untrack_child_process(child, hub)
        assert child._sentinel_poll is None and read not in hub.readers, (
            f"{CELERY}: _untrack_child_process no longer sets _sentinel_poll to None"
        )
        with pytest.raises(ValueError):
            stock._track_child_process(child, hub)
        ours._track_child_process(child, hub)
        assert not hub.readers, f"{CELERY}: an exited child is watched again"
    finally:
        os.close(write)
        hub.close()


def test_celery_precedence_lookup_ranks_a_custom_state_for_event_monitors():
    """states.PRECEDENCE_LOOKUP: what precedence() reads; Flower's event state merges by it."""
    assert isinstance(getattr(states, "PRECEDENCE_LOOKUP", None), dict), (
        f"{CELERY}: celery.states.PRECEDENCE_LOOKUP is gone"
    )
    custom = f"CANARY{uuid.uuid4().hex[:8].upper()}"
    assert states.precedence(custom) < states.precedence(states.REVOKED), (
        f"{CELERY}: an unknown state no longer ranks above REVOKED: the rank may be unneeded"
    )
    celery_internals.rank_state_between(custom, states.REVOKED, states.STARTED)
    try:
        assert (
            states.precedence(states.REVOKED)
            < states.precedence(custom)
            < states.precedence(states.STARTED)
        ), f"{CELERY}: precedence() no longer reads celery.states.PRECEDENCE_LOOKUP"
        monitor, task_id, now = State(), str(uuid.uuid4()), time.time()
        for n, kind in enumerate(("task-received", "task-started", f"task-{custom.lower()}")):
            monitor.event(_task_event(kind, task_id, now + n, n))
        monitor.event(_task_event("task-revoked", task_id, now + 3, 3))
        assert monitor.tasks[task_id].state == states.REVOKED, (
            f"{CELERY}: an event monitor keeps {monitor.tasks[task_id].state} over REVOKED"
        )
    finally:
        states.PRECEDENCE_LOOKUP.pop(custom, None)


def _task_event(kind: str, task_id: str, timestamp: float, clock: int) -> dict[str, Any]:
    return {
        "type": kind,
        "uuid": task_id,
        "hostname": "celery@canary",
        "timestamp": timestamp,
        "local_received": timestamp,
        "clock": clock,
    }


# --- kombu (worker/redis_transport.py) ---


def test_kombu_resolves_a_scheme_through_its_alias_table_and_cache():
    """TRANSPORT_ALIASES and _transport_cache: what get_transport_cls reads for a scheme."""
    original = "kombu.transport.redis:Transport"
    kombu_transport.TRANSPORT_ALIASES["redis"] = original
    kombu_transport._transport_cache.pop("redis", None)
    try:
        assert kombu_transport.get_transport_cls("redis") is kombu_redis.Transport, (
            f"{KOMBU}: get_transport_cls no longer reads TRANSPORT_ALIASES"
        )
        assert "redis" in kombu_transport._transport_cache, (
            f"{KOMBU}: get_transport_cls no longer caches in kombu.transport._transport_cache"
        )
    finally:
        redis_transport.register()
    assert kombu_transport.get_transport_cls("redis") is redis_transport.Transport, (
        f"{KOMBU}: registering under a scheme no longer replaces kombu's transport"
    )
    assert Connection("rediss://127.0.0.1:1/0").transport_cls == "rediss", (
        f"{KOMBU}: a Connection no longer keeps its URL's scheme (Flower reads it)"
    )


def test_kombu_qos_keeps_unacknowledged_messages_by_tag(redis_server):
    """QoS._delivered: the unacknowledged messages, which restore_unacked walks and clears."""
    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel = conn.default_channel
        queue = Queue("canary", Exchange("canary"), "canary")
        with conn.Producer() as producer:
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key="canary",
                             declare=[queue])  # fmt: skip
        message = channel.basic_get("canary", no_ack=False)
        assert message is not None
        delivered = getattr(channel.qos, "_delivered", None)
        assert delivered is not None and message.delivery_tag in delivered, (
            f"{KOMBU}: QoS._delivered no longer holds unacknowledged messages by tag"
        )
        channel.qos.restore_unacked()
        assert not channel.qos._delivered, f"{KOMBU}: restore_unacked left QoS._delivered"
        assert channel.basic_get("canary", no_ack=True) is not None, (
            f"{KOMBU}: restore_unacked did not put the message back"
        )


def test_kombu_builds_every_redis_client_from_connparams(redis_server):
    """Channel._connparams(asynchronous): where each of the channel's pools gets its
    parameters, so where a released connection is caught before kombu reads it."""
    calls: list[bool] = []

    class Spying(kombu_redis.Channel):
        def _connparams(self, asynchronous: bool = False) -> Any:
            calls.append(asynchronous)
            return super()._connparams(asynchronous)

    class Spied(kombu_redis.Transport):
        Channel = Spying

    with Connection(f"{redis_server.url}/6", transport=Spied) as conn:
        assert conn.default_channel.client.ping()
    assert calls, f"{KOMBU}: the Redis channel no longer builds its clients from _connparams"
    params = inspect.signature(kombu_redis.Channel._connparams).parameters
    assert "asynchronous" in params, f"{KOMBU}: Channel._connparams takes {list(params)}"


# --- kombu, the reliable fetch (worker/redis_transport.py, FETCH_INTERNALS) ---


class _Sent:
    """A stand-in for a connection's send_command that keeps what was sent."""

    def __init__(self) -> None:
        self.args: list[Any] = []

    def __call__(self, *args: Any) -> None:
        self.args = list(args)


def _consuming(conn: Connection, name: str) -> Any:
    queue = Queue(name, Exchange(name), name)
    channel = conn.default_channel
    consumer = conn.Consumer(queue, callbacks=[lambda body, message: message.ack()])
    consumer.consume()
    # What the poller does before a channel's first take (MultiChannelPoller._client_registered).
    client = channel.client
    client.connection = client.connection_pool.get_connection()
    return channel, queue


def _publish(conn: Connection, queue: Queue, priority: int = 0) -> None:
    with conn.Producer() as producer:
        producer.publish({"n": 1}, exchange=queue.exchange, routing_key=queue.routing_key,
                         declare=[queue], priority=priority)  # fmt: skip


def test_kombu_starts_the_blocking_take_in_brpop_start(redis_server):
    """Channel._brpop_start(timeout): what the poller calls to send the take of a channel that
    may consume: BRPOP over each priority step's key of each queue, then the timeout."""
    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel, _ = _consuming(conn, "canary-start")
        sent = _Sent()
        channel.client.connection.send_command = sent
        channel._brpop_start()
        assert sent.args[:1] == ["BRPOP"] and sent.args[-1] == channel.brpop_timeout, (
            f"{KOMBU}: Channel._brpop_start no longer sends BRPOP ... timeout: {sent.args}"
        )
        assert kombu_redis.MultiChannelPoller._register_BRPOP.__code__.co_names.count(
            "_brpop_start"
        ), f"{KOMBU}: the poller no longer starts a take through Channel._brpop_start"
        channel._in_poll = None


def test_kombu_reads_and_delivers_the_take_in_brpop_read(redis_server):
    """Channel._brpop_read: the handler of a readable take connection; it parses a [key,
    message] reply, delivers it, and raises Empty on a nil reply."""
    from queue import Empty

    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel, queue = _consuming(conn, "canary-read")
        assert channel.handlers["BRPOP"] == channel._brpop_read, (
            f"{KOMBU}: the poller's BRPOP handler is no longer Channel._brpop_read"
        )
        _publish(conn, queue)
        channel._brpop_start()
        assert channel._brpop_read() is True, f"{KOMBU}: _brpop_read did not deliver"
        assert channel.qos._delivered, f"{KOMBU}: _brpop_read's delivery was not recorded"
        channel._brpop_start(timeout=0.1)
        with pytest.raises(Empty):
            channel._brpop_read()


def test_kombu_rotates_the_queues_in_queue_cycle(redis_server):
    """Channel._queue_cycle: consume(n) gives the queues in the order of the take, and a
    delivery rotates its queue to the end."""
    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel = conn.default_channel
        for name in ("canary-a", "canary-b"):
            conn.Consumer(Queue(name, Exchange(name), name)).consume()
        cycle = channel._queue_cycle
        assert cycle.consume(2) == ["canary-a", "canary-b"], f"{KOMBU}: {cycle.consume(2)}"
        cycle.rotate("canary-a")
        assert cycle.consume(2) == ["canary-b", "canary-a"], (
            f"{KOMBU}: Channel._queue_cycle no longer rotates a served queue to the end"
        )


def test_kombu_names_a_priority_step_key_with_q_for_pri(redis_server):
    """Channel._q_for_pri(queue, pri): the list a message of that priority is pushed to."""
    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel, queue = _consuming(conn, "canary-pri")
        client = channel.client
        client.delete(*(channel._q_for_pri("canary-pri", p) for p in channel.priority_steps))
        _publish(conn, queue, priority=5)
        key = channel._q_for_pri("canary-pri", 5)
        assert key != "canary-pri" and client.llen(key) == 1, (
            f"{KOMBU}: a priority 5 message is not in Channel._q_for_pri's key {key!r}"
        )
        assert channel._q_for_pri("canary-pri", 0) == "canary-pri", f"{KOMBU}: priority 0"
        client.delete(key)


def test_kombu_marks_the_take_connection_in_poll(redis_server):
    """Channel._in_poll: the connection a take is pending on; the poller sends a new take only
    when it is falsy, and _brpop_read clears it."""
    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel, _ = _consuming(conn, "canary-poll")
        channel._brpop_start(timeout=0.1)
        assert channel._in_poll is channel.client.connection, (
            f"{KOMBU}: Channel._in_poll is not the pending take's connection"
        )
        with pytest.raises(Exception):  # noqa: B017 - Empty
            channel._brpop_read()
        assert not channel._in_poll, f"{KOMBU}: _brpop_read no longer clears Channel._in_poll"


def test_kombu_times_the_take_for_its_health_check(redis_server):
    """Channel._brpop_sent_at: when the pending take was sent, which the poller's health check
    reads to drop a connection whose reply is overdue."""
    with Connection(f"{redis_server.url}/6", transport=kombu_redis.Transport) as conn:
        channel, _ = _consuming(conn, "canary-sent")
        channel._brpop_start(timeout=0.1)
        assert isinstance(channel._brpop_sent_at, float), f"{KOMBU}: _brpop_sent_at not set"
        source = inspect.getsource(kombu_redis.MultiChannelPoller.maybe_check_brpop_health)
        assert "_brpop_sent_at" in source, (
            f"{KOMBU}: the BRPOP health check no longer reads Channel._brpop_sent_at"
        )
        with pytest.raises(Exception):  # noqa: B017 - Empty
            channel._brpop_read()


# --- urllib3 (tasks/core/http.py) ---


def test_urllib3_dials_dns_host_in_new_conn():
    """HTTPConnection._new_conn dials (self._dns_host, self.port); connect() goes through it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        dialled: list[str] = []

        class Spying(HTTPConnection):
            def _new_conn(self) -> socket.socket:
                dialled.append(self._dns_host)
                self._dns_host = "127.0.0.1"  # what the address check does with each address
                return super()._new_conn()  # type: ignore[no-any-return]

        conn = Spying("canary.invalid.", port, timeout=5)
        try:
            conn.connect()
            assert conn.sock is not None and conn.sock.getpeername()[0] == "127.0.0.1", (
                f"{URLLIB3}: HTTPConnection._new_conn no longer dials self._dns_host"
            )
        finally:
            conn.close()
    assert dialled == ["canary.invalid."], (
        f"{URLLIB3}: connect() no longer goes through _new_conn with _dns_host as the host "
        f"given ({dialled})"
    )


# --- the count ---


def _product_files() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (BASES[top] / top).rglob("*.py"))


def _rel(path: Path) -> Path:
    """A product file's path from its package's base: `download_client/cli.py`."""
    base = ROOT / "client" if path.is_relative_to(ROOT / "client") else ROOT
    return path.relative_to(base)


def _private(name: str) -> bool:
    return bool(re.fullmatch(r"_[A-Za-z0-9]\w*", name)) and not name.endswith("__")


def _own_names() -> set[str]:
    """Private names the product defines itself: functions, methods, classes, and attributes it
    assigns (kept out only where no upstream class of the same object knows them, below)."""
    own: set[str] = set()
    for path in _product_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                own.add(node.id)
    return {n for n in own if _private(n)}


def _upstream(cls: type) -> bool:
    return cls.__module__.split(".")[0] in UPSTREAM


def _names_upstream_classes_know(classes: list[type]) -> set[str]:
    """Private attributes of upstream classes: class attributes, and instance attributes their
    own source assigns or reads through `self`."""
    known: set[str] = set()
    for cls in classes:
        known.update(n for n in vars(cls) if _private(n))
        known.update(n for n in getattr(cls, "__slots__", ()) if _private(n))
        try:
            source = inspect.getsource(cls)
        except (OSError, TypeError):
            continue
        known.update(n for n in re.findall(r"self\.(_\w+)", source) if _private(n))
    return known


def _class_tree(cls: type) -> ast.AST:
    """A product class's definition. Found by name in its module: a Celery bootstep's metaclass
    sets `__qualname__` to the dotted path, where inspect.getsource cannot find the class."""
    module = ast.parse(inspect.getsource(sys.modules[cls.__module__]))
    return next(
        node
        for node in ast.walk(module)
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__
    )


def _overrides_and_inherited_uses() -> dict[str, set[str]]:
    """For each product class built on an upstream class: the private names its product classes
    (it and its product mixins) define or reach that an upstream class of its MRO knows."""
    found: dict[str, set[str]] = {}
    for path in _product_files():
        module = ".".join(_rel(path).with_suffix("").parts).removesuffix(".__init__")
        loaded = importlib.import_module(module)
        for _, cls in inspect.getmembers(loaded, inspect.isclass):
            if cls.__module__ != module:
                continue
            upstream = [c for c in cls.__mro__ if _upstream(c)]
            if not upstream:
                continue
            known = _names_upstream_classes_know(upstream)
            for mine in (c for c in cls.__mro__ if c.__module__.split(".")[0] in PRODUCT):
                source = _class_tree(mine)
                names = {n.attr for n in ast.walk(source) if isinstance(n, ast.Attribute)}
                names |= {
                    n.name for n in ast.walk(source) if isinstance(n, ast.FunctionDef)
                } | {n.target.id for n in ast.walk(source) if isinstance(n, ast.AnnAssign)
                     and isinstance(n.target, ast.Name)}  # fmt: skip
                hits = {n for n in names if _private(n)} & known
                if hits:
                    where = inspect.getsourcefile(mine)
                    assert where is not None
                    rel = str(_rel(Path(where)))
                    found.setdefault(rel, set()).update(hits)
    return found


def _direct_uses(own: set[str]) -> dict[str, set[str]]:
    """Private names reached on anything but the product's own objects (a module, another
    library's object, getattr with a string), imports of them or of private modules, and the
    undocumented globals."""
    found: dict[str, set[str]] = {}
    for path in _product_files():
        rel = str(_rel(path))
        for node in ast.walk(ast.parse(path.read_text())):
            names: set[str] = set()
            if isinstance(node, ast.Attribute):
                if _private(node.attr) and node.attr not in own:
                    names.add(node.attr)
                if node.attr in UNDOCUMENTED:
                    names.add(node.attr)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                if _private(node.value) and node.value not in own:
                    names.add(node.value)
            elif isinstance(node, ast.ImportFrom) and node.module:
                top, *rest = node.module.split(".")
                if top in UPSTREAM:
                    names |= {p for p in rest if _private(p)}
                    names |= {
                        a.name for a in node.names if _private(a.name) or a.name in UNDOCUMENTED
                    }
            elif isinstance(node, ast.Name) and node.id in UNDOCUMENTED:
                names.add(node.id)
            if names:
                found.setdefault(rel, set()).update(names)
    return found


def test_upstream_private_names_live_behind_three_doors():
    found = _direct_uses(_own_names())
    for module, names in _overrides_and_inherited_uses().items():
        found.setdefault(module, set()).update(names)
    for module, names in STANDARD_LIBRARY.items():
        found[module] -= names
        if not found[module]:
            del found[module]
    fetch = found.get("worker/redis_transport.py", set()) & redis_transport.FETCH_INTERNALS
    assert fetch == redis_transport.FETCH_INTERNALS == set(FETCH_CANARIES), (
        f"the fetch's private names: used {sorted(fetch)}, listed "
        f"{sorted(redis_transport.FETCH_INTERNALS)}, with a canary {sorted(FETCH_CANARIES)}"
    )
    assert all(callable(globals().get(test)) for test in FETCH_CANARIES.values())
    found["worker/redis_transport.py"] -= fetch
    assert found == DOORS, (
        "upstream private names outside their doors or without a canary "
        f"(found {found}, expected {DOORS}): put a new one behind one of the three doors, "
        "with a comment naming the upstream code and a canary here"
    )
    assert len(DOORS) <= 3
    assert sum(len(n) for n in DOORS.values()) <= MAX_NAMES
