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


class QuietHandler(BaseHTTPRequestHandler):
    """Keep-alive, and no line a request on standard error."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Delayed(QuietHandler):
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


class OriginProcess:
    """`python -m <module> PORT [ARGS]` as a child process on a free loopback port, once its
    `ping` path answers 200: an origin of the benchmark's that shares nothing with what it
    measures."""

    def __init__(self, module: str, ping: str, *args: str) -> None:
        self.port, self.ping = free_port(), ping
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, str(self.port), *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(self._answers, 30, f"{module} to answer")

    def get(self, path: str) -> bytes | None:
        """The body of a GET on the origin, None when it does not answer 200."""
        import http.client

        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            return body if response.status == 200 else None
        except OSError:
            return None

    def _answers(self) -> bool:
        return self.get(self.ping) is not None

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class DelayedOrigin(OriginProcess):
    """`python -m bench.delayed PORT [LOG]`."""

    def __init__(self, log: str | None = None) -> None:
        super().__init__("bench.delayed", "/0/1/ping", *([log] if log else []))

    def url(self, ms: int, size: int = 16 * 1024) -> str:
        return f"http://127.0.0.1:{self.port}/{ms}/{size}"


def main() -> None:
    if len(sys.argv) > 2:
        _LOG.append(open(sys.argv[2], "a"))  # noqa: SIM115 (open for the process's life)
    server = _Server(("127.0.0.1", int(sys.argv[1])), _Delayed)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
