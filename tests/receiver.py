"""A callback receiver for the tests, as a service would write one: it verifies the signature
with the shared secret, refuses stale timestamps and replayed requests, and records what it got.
`status` sets what it answers (500: a receiver that never accepts)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TOLERANCE_S = 300


@dataclass
class Delivery:
    task_id: str
    state: str
    body: dict[str, Any]
    signature: str
    raw: bytes
    verdict: int


@dataclass
class Book:
    deliveries: list[Delivery] = field(default_factory=list)
    connections: int = 0
    seen: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self, task_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.task_id == task_id and d.verdict == 200]

    def attempts(self, task_id: str) -> int:
        with self.lock:
            return sum(1 for d in self.deliveries if d.task_id == task_id)


def verify(secret: str, header: str, raw: bytes, now: float | None = None) -> bool:
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    stamp, mac = parts.get("t", ""), parts.get("v1", "")
    expected = hmac.new(secret.encode(), f"{stamp}.".encode() + raw, hashlib.sha256).hexdigest()
    fresh = stamp.isdigit() and abs((now or time.time()) - int(stamp)) <= TOLERANCE_S
    return fresh and hmac.compare_digest(expected, mac)


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        header = self.headers.get("Downloads-Signature", "")
        verdict = self.server.judge(header, raw)
        doc = json.loads(raw) if verdict != 401 else {}
        with self.server.book.lock:
            self.server.book.deliveries.append(
                Delivery(doc.get("task_id", ""), doc.get("state", ""), doc, header, raw, verdict)
            )
        self.send_response(verdict)
        self.send_header("Content-Length", "0")
        self.end_headers()


class Receiver(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, secret: str, port: int = 0, status: int = 200) -> None:
        self.secret, self.status, self.book = secret, status, Book()
        super().__init__(("127.0.0.1", port), _Handler)

    def judge(self, header: str, raw: bytes) -> int:
        if not verify(self.secret, header, raw):
            return 401
        with self.book.lock:
            if header in self.book.seen:
                return 409  # the same signed request again: a replay
            self.book.seen.add(header)
        return self.status

    def get_request(self) -> Any:
        conn = super().get_request()
        with self.book.lock:
            self.book.connections += 1
        return conn

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def start(self) -> Receiver:
        threading.Thread(target=self.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()
