"""An origin that counts what it sends, in a process of its own: `python -m bench.metered PORT`
serves GET /<bytes>/<name> with <bytes> bytes, keep-alive, written 64 KiB at a time, and
GET /sent with the bytes it had written at each quarter of a second since it started: its rate
as the origin sees it (TCP flow control included), which is what a bandwidth budget limits."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

from bench.delayed import OriginProcess, QuietHandler

PIECE = b"\0" * (64 * 1024)
TICK_S = 0.25
SNDBUF = 128 * 1024
_SENT = [0]
_SAMPLES: list[tuple[float, int]] = []
_LOCK = threading.Lock()


class _Metered(QuietHandler):
    def do_GET(self) -> None:
        if self.path == "/sent":
            with _LOCK:
                body = json.dumps(_SAMPLES).encode()
        else:
            body = b""
        n = int(self.path.split("/")[1]) if not body else len(body)
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.send_header("ETag", '"metered"')
        self.end_headers()
        if body:
            self.wfile.write(body)
            return
        left = n
        while left:
            piece = PIECE[: min(left, len(PIECE))]
            self.wfile.write(piece)
            left -= len(piece)
            with _LOCK:
                _SENT[0] += len(piece)


def _sample() -> None:
    while True:
        with _LOCK:
            _SAMPLES.append((time.time(), _SENT[0]))
        time.sleep(TICK_S)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def get_request(self) -> tuple[socket.socket, Any]:
        conn = super().get_request()
        # A fixed send buffer (autotuning off): what it holds leaves the count's clock behind
        # the downloads' by at most this much per connection.
        conn[0].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        return conn


class MeteredOrigin(OriginProcess):
    """`python -m bench.metered PORT`."""

    def __init__(self) -> None:
        super().__init__("bench.metered", "/sent")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sent(self) -> list[tuple[float, int]] | None:
        body = self.get("/sent")
        return None if body is None else [(float(t), int(n)) for t, n in json.loads(body)]


def rate(samples: list[tuple[float, int]], start: float, end: float) -> float:
    """Bytes a second the origin wrote between two Unix times (the samples nearest inside)."""
    inside = [(t, n) for t, n in samples if start <= t <= end]
    (t0, n0), (t1, n1) = inside[0], inside[-1]
    return (n1 - n0) / (t1 - t0)


def main() -> None:
    threading.Thread(target=_sample, daemon=True).start()
    server = _Server(("127.0.0.1", int(sys.argv[1])), _Metered)
    server.serve_forever()


if __name__ == "__main__":
    main()
