"""kombu's Redis transport with two repairs, both about a Redis that goes away under a worker.

- Celery closes the broker connection when Redis dies, and kombu's channel, on closing, puts the
  worker's unacknowledged messages back in the queue through a new connection pool. If the
  connection's transport was already released, building that pool raises AttributeError, which
  nothing catches: the worker exits ("Unrecoverable error"). Raising the connection error kombu
  expects lets Celery reconnect as it does for any outage.
- That putting back cannot work while Redis is down, and kombu tries it once. Celery has by then
  dropped the messages it held in memory (retries waiting for their countdown, prefetched ones),
  so they would wait in Redis's unacknowledged set for the visibility timeout (hours). The tags
  are remembered here and put back through the next channel that reaches Redis.

kombu documents no hook for either repair, nor a way to name a transport class under a scheme:
this module is one of the worker's three doors to upstream internals (worker/celery_internals.py
says which), and each private name below has a canary in tests/test_upstream_canaries.py."""

from __future__ import annotations

from typing import Any

import redis
from kombu import transport as kombu_transport
from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis

# Delivery tags of this process's messages not yet put back: their bodies wait in Redis's
# unacknowledged hash, so the tag is all that restoring one needs.
_stranded: set[str] = set()


class QoS(kombu_redis.QoS):
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


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]
        # It has just answered a ping: Redis is here.
        self._restore_stranded()

    def _restore_stranded(self) -> None:
        for tag in sorted(_stranded):
            try:
                self.qos.restore_by_tag(tag, leftmost=True)
            except self.connection_errors:
                return  # gone again: the next channel tries
            _stranded.discard(tag)

    # kombu/transport/redis.py, `Channel._connparams` (read in 5.7.0): where every connection
    # pool of the channel gets its parameters, reading `connection.client` (None once the
    # transport is released). The one place to raise kombu's connection error before that read.
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        if self.connection.client is None:
            raise redis.ConnectionError("the broker connection is already closed")
        params: dict[str, Any] = super()._connparams(asynchronous)  # type: ignore[no-untyped-call]
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel


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
