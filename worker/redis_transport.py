"""kombu's Redis transport with two repairs, both about a Redis that goes away under a worker.

- Celery closes the broker connection when Redis dies, and kombu's channel, on closing, puts the
  worker's unacknowledged messages back in the queue through a new connection pool. If the
  connection's transport was already released, building that pool raises AttributeError, which
  nothing catches: the worker exits ("Unrecoverable error"). Raising the connection error kombu
  expects lets Celery reconnect as it does for any outage.
- That putting back cannot work while Redis is down, and kombu tries it once. Celery has by then
  dropped the messages it held in memory (retries waiting for their countdown, prefetched ones),
  so they would wait in Redis's unacknowledged set for the visibility timeout (hours). The tags
  are remembered here and put back through the next channel that reaches Redis."""

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
    so URLs keep their scheme: Flower picks its broker API by it."""
    for scheme in ("redis", "rediss"):
        TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        kombu_transport._transport_cache.pop(scheme, None)  # resolved before: resolve again
