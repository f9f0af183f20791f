"""The test origin, recording each request as an interval with what it sent: the soak judges
double writers and needless transfers from what the origin saw, not from what the worker says.
Requests with `down=1` meet an origin that is down for minutes at a time (`Outages`)."""

from __future__ import annotations

import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.server import Handler, OriginServer


@dataclass
class Transfer:
    key: str
    start: float
    status: int = 0
    range_start: int | None = None
    length: int | None = None
    body_bytes: int = 0
    end: float = 0.0

    @property
    def complete(self) -> bool:
        """The whole body left the origin (a cut, a stall or a hang-up ends it short)."""
        return self.length is not None and self.body_bytes >= self.length

    @property
    def full_body(self) -> bool:
        """A body sent from its first byte: what a needless transfer costs."""
        return self.status == 200 and self.body_bytes > 0


@dataclass(frozen=True)
class Outages:
    """The cycle of the origin's `down=1` paths from its start: 503 to every request for
    `down_s`, then served for `up_s`, and again."""

    down_s: float
    up_s: float

    def down(self, since_start: float) -> bool:
        return since_start % (self.down_s + self.up_s) < self.down_s

    @property
    def deadline_s(self) -> float:
        """The deadline of the downloads of those paths: longer than an outage by a whole
        up phase and an outage more, for the chaos' own faults (a Redis crash, a restart)."""
        return 2 * self.down_s + self.up_s


@dataclass
class Ledger:
    transfers: dict[str, list[Transfer]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, t: Transfer) -> None:
        with self.lock:
            self.transfers.setdefault(t.key, []).append(t)

    def of(self, key: str) -> list[Transfer]:
        with self.lock:
            return list(self.transfers.get(key, []))


class _CountingFile:
    """Counts the body bytes the handler writes (after the headers). Before the first, it looks
    whether the client has hung up (a read timeout during a stall): the kernel would accept a
    small body for a socket nobody reads, and the origin would count a transfer that never was."""

    def __init__(self, raw: Any, transfer: Transfer, sock: socket.socket) -> None:
        self.raw, self.transfer, self.sock, self.in_body = raw, transfer, sock, False

    def write(self, data: bytes) -> int:
        if self.in_body and not self.transfer.body_bytes and _hung_up(self.sock):
            raise BrokenPipeError("the client hung up before the body")
        n: int = self.raw.write(data)
        if self.in_body:
            self.transfer.body_bytes += len(data)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


def _hung_up(sock: socket.socket) -> bool:
    readable, _, _ = select.select([sock], [], [], 0)
    try:
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class RecordingHandler(Handler):
    server: RecordingOrigin

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        key = query.get("key", [parts.path])[-1]
        rng = self.headers.get("Range")
        transfer = Transfer(key, time.monotonic())
        if rng:
            transfer.range_start = int(rng.removeprefix("bytes=").split("-")[0])
        self.server.ledger.add(transfer)
        self._transfer = transfer
        self.wfile = _CountingFile(self.wfile, transfer, self.connection)  # type: ignore[assignment]
        try:
            super().do_GET()
            self.wfile.flush()
        except OSError:
            pass  # the client went away: the transfer is recorded as short
        finally:
            transfer.end = time.monotonic()
            self.wfile = self.wfile.raw  # type: ignore[attr-defined]

    def _route(self, path: str, q: dict[str, str], hit: int) -> None:
        if "down" in q and self.server.outages.down(time.monotonic() - self.server.began):
            return self._send(503, b"down for maintenance\n")
        return super()._route(path, q, hit)

    def send_response(self, code: int, message: str | None = None) -> None:
        self._transfer.status = code
        super().send_response(code, message)

    def send_header(self, keyword: str, value: str) -> None:
        if keyword.lower() == "content-length" and value.isdigit():
            self._transfer.length = int(value)
        super().send_header(keyword, value)

    def end_headers(self) -> None:
        super().end_headers()
        self.wfile.in_body = True  # type: ignore[attr-defined]


class RecordingOrigin(OriginServer):
    def __init__(self, outages: Outages) -> None:
        super().__init__()
        self.RequestHandlerClass = RecordingHandler
        self.ledger = Ledger()
        self.outages = outages
        self.began = time.monotonic()
