"""An origin that waits before answering (time to first byte), in a process of its own so that
it does not share the benchmark's interpreter with what is measured: `python -m bench.delayed`
serves GET /<ms>/<bytes>/<name> with <bytes> bytes after <ms> milliseconds, keep-alive. With a
second argument, a file, it appends each request's `<name> <start> <end>` (Unix seconds) there:
how long each held a connection, counted at the origin."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.harness import free_port, wait_for

_BODIES: dict[int, bytes] = {}
_LOG: list[Any] = []
_LOCK = threading.Lock()


class _Delayed(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        start = time.time()
        _, ms, size, *rest = self.path.split("/", 3)
        time.sleep(int(ms) / 1000)
        n = int(size)
        body = _BODIES.setdefault(n, b"\0" * n)
        self.send_response(200)
        self.send_header("Content-Length", str(n))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(body)
        if _LOG:
            with _LOCK:
                _LOG[0].write(f"{(rest or ['-'])[0]} {start:.6f} {time.time():.6f}\n")
                _LOG[0].flush()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 32 clients connecting at once must not wait on the backlog


class DelayedOrigin:
    """`python -m bench.delayed PORT` as a child process, on a free loopback port."""

    def __init__(self, log: str | None = None) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.delayed", str(self.port), *([log] if log else [])],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 30, "the delayed origin to answer")

    def _answers(self) -> bool:
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            conn.request("GET", "/0/1/ping")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def url(self, ms: int, size: int = 16 * 1024) -> str:
        return f"http://127.0.0.1:{self.port}/{ms}/{size}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def main() -> None:
    if len(sys.argv) > 2:
        _LOG.append(open(sys.argv[2], "a"))  # noqa: SIM115 (open for the process's life)
    server = _Server(("127.0.0.1", int(sys.argv[1])), _Delayed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
