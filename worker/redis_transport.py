"""kombu's Redis transport with a fetch that leaves no window, and two repairs, all about a Redis
that goes away under a worker.

- **A fetch with no window.** kombu takes a message off the queue with BRPOP and records it as
  unacknowledged (the `unacked` hash and the `unacked_index` sorted set) in a second command: a
  Redis crash between the two loses the message (kombu#305). Here one Lua script takes the
  message from the first non-empty key, in kombu's order (each priority step, then each queue of
  the rotation), and writes that record in the same atomic step. Redis cannot block a script, so
  an idle channel blocks first on `BLMOVE k k RIGHT RIGHT` (which moves the oldest message of
  `k` onto itself: it consumes nothing and leaves the order as it was) over the queue it took
  from last (the end of kombu's rotation), pipelined with the take: a message there starts at
  once; one on any other key (another priority step, another queue such as a lane of
  worker/lanes.py) waits at most the BRPOP timeout kombu already uses (1 s), or LANE_WAIT_S
  when the channel consumes several queues. A channel that has just received a message takes
  again without waiting. Needs Redis 6.2 (BLMOVE); the first channel of a process checks it.
- **Leases instead of the visibility timeout.** The record's score in `unacked_index` is renewed
  every `fetch_renew_interval` seconds for each message the process holds (running, prefetched,
  waiting for its countdown), so kombu's own sweep (`restore_visible`), run with `fetch_lease` as
  its visibility timeout, puts back only what a dead process held: within the lease plus the
  sweep's interval. After Redis was away, a process sweeps only once it has seen Redis answer
  for a whole lease (a grace period), so the living holders renew first.
- Celery closes the broker connection when Redis dies, and kombu's channel, on closing, puts the
  worker's unacknowledged messages back in the queue through a new connection pool. If the
  connection's transport was already released, building that pool raises AttributeError, which
  nothing catches: the worker exits ("Unrecoverable error"). Raising the connection error kombu
  expects lets Celery reconnect as it does for any outage.
- That putting back cannot work while Redis is down, and kombu tries it once. Celery has by then
  dropped the messages it held in memory (retries waiting for their countdown, prefetched ones),
  so they would wait in Redis's unacknowledged set until the lease lapses. The tags are
  remembered here and put back through the next channel that reaches Redis.

kombu documents no hook for any of these, nor a way to name a transport class under a scheme:
this module is one of the worker's three doors to upstream internals (worker/celery_internals.py
says which), and each private name below has a canary in tests/test_upstream_canaries.py."""

from __future__ import annotations

import logging
import weakref
from queue import Empty
from time import monotonic, time
from typing import Any

import redis
from kombu import transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

# The private kombu names the fetch relies on, apart from the repairs' (each has a comment where
# it is used and a canary in tests/test_upstream_canaries.py, which counts them on their own).
FETCH_INTERNALS = frozenset(
    {"_brpop_start", "_brpop_read", "_queue_cycle", "_q_for_pri", "_in_poll", "_brpop_sent_at"}
)

# An idle channel consuming several queues (a queue and its lanes) looks at all of them this
# often: a blocking wait watches one key.
LANE_WAIT_S = 0.25

# The Redis version the fetch needs: BLMOVE came in 6.2.
MIN_REDIS = (6, 2)

# KEYS: the queue keys in kombu's order, then the unacknowledged hash and its index.
# ARGV: the number of queue keys, the time of the take (the record's score, as kombu's own).
# The record is kombu's ([message, exchange, routing key] by delivery tag), built around the
# message's own text so that nothing in it is re-encoded.
TAKE = """
local n = tonumber(ARGV[1])
for i = 1, n do
  local item = redis.call('RPOP', KEYS[i])
  if item then
    local ok, message = pcall(cjson.decode, item)
    if ok and type(message) == 'table' and type(message['properties']) == 'table' then
      local properties = message['properties']
      local tag, info = properties['delivery_tag'], properties['delivery_info']
      if type(tag) == 'string' and type(info) == 'table' then
        redis.call('HSET', KEYS[n + 1], tag, '[' .. item .. ',' .. cjson.encode(info['exchange'])
          .. ',' .. cjson.encode(info['routing_key']) .. ']')
        redis.call('ZADD', KEYS[n + 2], ARGV[2], tag)
      end
    end
    return {KEYS[i], item}
  end
end
return false
"""

# The Redis servers (host, port, socket) whose version this process has checked.
_checked: set[tuple[str, ...]] = set()

# Delivery tags of this process's messages not yet put back: their bodies wait in Redis's
# unacknowledged hash, so the tag is all that restoring one needs.
_stranded: set[str] = set()


class _Reach:
    """When this process last saw Redis come back: the grace period counts from there. It starts
    at the process's start, which may follow a restart of Redis itself."""

    back_since = monotonic()
    away = False

    @classmethod
    def lost(cls) -> None:
        cls.away = True

    @classmethod
    def seen(cls) -> None:
        if cls.away:
            cls.away = False
            cls.back_since = monotonic()

    @classmethod
    def settled(cls, grace: float) -> bool:
        return not cls.away and monotonic() - cls.back_since >= grace


class QoS(kombu_redis.QoS):
    @property
    def visibility_timeout(self) -> float:
        # kombu's sweep puts back records whose score is older than this: a lapsed lease.
        return float(self.channel.fetch_lease)

    def restore_visible(self, start: int = 0, num: int = 10, interval: int = 10) -> None:
        if _Reach.settled(self.channel.fetch_lease):
            super().restore_visible(start, num, interval)  # type: ignore[no-untyped-call]

    def restore_unacked(self, client: Any = None) -> None:
        # kombu/transport/virtual/base.py, `QoS._delivered` (read in 5.7.0): the ordered dict of
        # this channel's unacknowledged messages by delivery tag, which kombu's Redis
        # `restore_unacked` walks and then clears; QoS has no public list of them.
        tags = list(self._delivered)
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except Exception:
            _stranded.update(tags)
            raise

    def held(self) -> list[str]:
        """The delivery tags this channel holds: running, prefetched, waiting for a countdown."""
        return list(self._delivered)


class Channel(kombu_redis.Channel):
    QoS = QoS

    #: Seconds a holding lasts without renewal; also the grace period after an outage.
    fetch_lease = 30
    #: Seconds between renewals of a process's holdings.
    fetch_renew_interval = 5
    from_transport_options: tuple[str, ...] = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "fetch_lease",
        "fetch_renew_interval",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._fetch_idle = False  # the last take found nothing: wait before the next one
        self._fetch_waits = False  # a BLMOVE reply comes before the take's
        try:
            super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        except redis.ConnectionError:
            _Reach.lost()
            raise
        # It has just answered a ping: Redis is here.
        _Reach.seen()
        self._check_version()
        _channels.add(self)
        self._restore_stranded()

    def _check_version(self) -> None:
        params = self.client.connection_pool.connection_kwargs
        where = tuple(str(params.get(k)) for k in ("host", "port", "path"))
        if where in _checked:
            return
        version = str(self.client.info("server").get("redis_version", "0"))
        found = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if found < MIN_REDIS:
            raise RuntimeError(
                f"Redis {version} is too old for the worker's broker: it needs Redis "
                f"{'.'.join(map(str, MIN_REDIS))} or newer (BLMOVE)"
            )
        _checked.add(where)

    def _restore_stranded(self) -> None:
        for tag in sorted(_stranded):
            try:
                self.qos.restore_by_tag(tag, leftmost=True)
            except self.connection_errors:
                return  # gone again: the next channel tries
            _stranded.discard(tag)

    # kombu/transport/redis.py, `Channel._brpop_start` (read in 5.7.0): sends the blocking take
    # (BRPOP over every queue x priority key of `_queue_cycle`, keys built by `_q_for_pri`) on
    # `client.connection`, marking it `_in_poll` and timing it in `_brpop_sent_at` for kombu's
    # health check; MultiChannelPoller calls it whenever the channel may consume. Replaced by
    # the atomic take, preceded by a wake-up that consumes nothing when the channel is idle.
    def _brpop_start(self, timeout: float | None = None) -> None:
        wait = timeout or self.brpop_timeout or 1
        queues = self._queue_cycle.consume(len(self.active_queues))
        if not queues:
            return
        prefix = self.global_keyprefix
        keys = [prefix + str(self._q_for_pri(queue, pri))  # type: ignore[no-untyped-call]
                for pri in self.priority_steps for queue in queues]  # fmt: skip
        record = [prefix + self.unacked_key, prefix + self.unacked_index_key]
        commands: list[tuple[Any, ...]] = []
        self._fetch_waits = self._fetch_idle
        if self._fetch_waits:
            # The queue taken from last (the end of kombu's round robin), where the next
            # message most likely comes: the busy queue rather than its lanes. A message on
            # another queue is seen when the wait ends: within LANE_WAIT_S where there are some.
            last = keys[len(queues) - 1]
            if len(queues) > 1:
                wait = min(wait, LANE_WAIT_S)
            commands.append(("BLMOVE", last, last, "RIGHT", "RIGHT", wait))
        commands.append(("EVAL", TAKE, len(keys) + 2, *keys, *record, len(keys), time()))
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        connection.send_packed_command(connection.pack_commands(commands))

    # kombu/transport/redis.py, `Channel._brpop_read` (read in 5.7.0): the handler of a readable
    # take connection; it parses a `[key, message]` reply, rotates the queues, delivers (where
    # QoS.append records the message again, as kombu always did) or raises Empty. The take's
    # reply has that shape; the wake-up's reply, when one was sent, is read first.
    def _brpop_read(self, **options: Any) -> bool:
        if self._fetch_waits:
            self._fetch_waits = False
            connection = self.client.connection
            try:
                self.client.parse_response(connection, "BLMOVE", **options)
            except self.connection_errors:
                _Reach.lost()
                connection.disconnect()
                self._in_poll = None  # type: ignore[assignment]
                raise
        try:
            delivered: bool = super()._brpop_read(**options)  # type: ignore[no-untyped-call]
        except self.connection_errors:
            _Reach.lost()
            raise
        except Empty:
            self._fetch_idle = True
            raise
        self._fetch_idle = False
        return delivered

    def renew(self) -> None:
        """Renew the lease of every message this channel holds (never re-adding an acked one)."""
        tags = self.qos.held()
        if not tags:
            return
        now = time()
        with self.conn_or_acquire() as client:
            client.zadd(self.unacked_index_key, dict.fromkeys(tags, now), xx=True)

    # kombu/transport/redis.py, `Channel._connparams` (read in 5.7.0): where every connection
    # pool of the channel gets its parameters, reading `connection.client` (None once the
    # transport is released; `connection` itself is None once the channel is closed, and a
    # producer may still publish through it). The one place to raise kombu's connection error
    # before that read.
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("the broker connection is already closed")
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        return params


# The channels of this process that may hold messages, for the renewal.
_channels: weakref.WeakSet[Channel] = weakref.WeakSet()


def renew_all() -> None:
    """Renew the holdings of every open channel of this process; a Redis that does not answer
    restarts the grace period of this process's sweep."""
    for channel in list(_channels):
        if channel.closed:
            _channels.discard(channel)
            continue
        try:
            channel.renew()
        except channel.connection_errors:
            _Reach.lost()
            return
        except redis.RedisError as exc:
            log.warning("holdings not renewed (%s)", exc)


class Transport(kombu_redis.Transport):
    Channel = Channel
    _renewal: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        super().register_with_event_loop(connection, loop)  # type: ignore[no-untyped-call]
        if Transport._renewal is not None:
            Transport._renewal.cancel()  # a previous connection's, after a reconnect
        every = connection.client.transport_options.get(
            "fetch_renew_interval", Channel.fetch_renew_interval
        )
        Transport._renewal = loop.call_repeatedly(every, renew_all)


def register() -> None:
    """Make `redis://` and `rediss://` URLs use this transport in this process (the worker and
    Flower build the same app). Registered under the schemes, not named in `broker_transport`,
    so URLs keep their scheme: Flower picks its broker API by it, and kombu refuses a
    `module:Class` scheme in a broker URL.

    kombu/transport/__init__.py (read in 5.7.0): `TRANSPORT_ALIASES`, the scheme -> class table
    that `resolve_transport` reads, and `_transport_cache`, where `get_transport_cls` keeps what
    it resolved."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu_transport._transport_cache.pop(scheme, None)  # resolved before: resolve again
