"""A small threaded HTTP/1.1 origin on 127.0.0.1 for tests, the demo and the benchmark.

Bodies are deterministic: GET /bytes/<n>?seed=<s> returns `body(n, s)`, with a strong ETag,
Last-Modified, Range/If-Range and If-None-Match support. Query parameters switch on faults:

  status=<code>        answer that status (with retry_after=<s> as Retry-After)
  flaky=<n>            the first n requests for this key answer 503 (fail=<code> to change it)
  cut=<k>              send the headers for the whole body, then drop the connection after k bytes
                       (cut_times=<n>: only the first n requests; default every request)
  reset=1              with cut: end the connection with a TCP reset instead of a close
  drop_after=<k>       every response sends k bytes of its body (or of its range), then resets
                       (drop_times=<n>: only the first n requests)
  short=<k>            Content-Length says n, the body stops at k and the connection closes
  stall=<s>            sleep s seconds after the headers, before the body (stall_times=<n>:
                       only the first n requests)
  rate=<bytes/s>       send the body slowly
  hold=<name>          send the first half of the body, then a byte every 0.25 s until the
                       test calls `release(name)`, then the rest (at once once released)
  endless=1            an endless body without Content-Length
  gzip=1               Content-Encoding: gzip of n zero bytes (a small bomb), unasked
  redirect=<n>         a chain of n redirects before the body (to=<url> for the last hop)
  noetag=1, nolm=1     leave out the ETag / Last-Modified validators
  norange=1            ignore Range (answer 200 with the whole body)
  flood=<n>            add n junk headers
  ctype=<type>         Content-Type (default application/octet-stream)
  clen=<raw>           send this literal Content-Length instead of the body's (clen2=<raw>: a
                       second Content-Length header too), then close the connection
  chunked=1            send the body with Transfer-Encoding: chunked (with clen, both framings)
  key=<k>              the counter flaky and cut_times use (default: the path)
Every request is logged (path, query, headers) and every accepted connection counted.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

LINGER_ZERO = struct.pack("ii", 1, 0)
LAST_MODIFIED = formatdate(1_700_000_000, usegmt=True)
_BLOCKS: dict[str, bytes] = {}


def body(n: int, seed: str = "0") -> bytes:
    """The deterministic body of /bytes/<n>?seed=<seed>."""
    return _block(seed) * (n // 65536) + _block(seed)[: n % 65536]


def body_range(n: int, seed: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `body(n, seed)`, made without the rest of it."""
    block = _block(seed)
    skip = start - start % len(block)
    reps = -(-(min(end, n) - skip) // len(block))
    return (block * reps)[start - skip : min(end, n) - skip]


def _block(seed: str) -> bytes:
    if seed not in _BLOCKS:
        h = hashlib.sha256(seed.encode()).digest()
        _BLOCKS[seed] = b"".join(
            hashlib.sha256(h + i.to_bytes(4, "big")).digest() for i in range(2048)
        )
    return _BLOCKS[seed]


@functools.lru_cache(maxsize=4)
def gzipped_zeros(n: int) -> bytes:
    """The gzip=1 body: n zero bytes, compressed (kept: 100 MB take a CPU-second or more)."""
    return gzip.compress(b"\0" * n, 9)


def body_sha256(n: int, seed: str = "0") -> str:
    return hashlib.sha256(body(n, seed)).hexdigest()


@dataclass
class Logged:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at: float = 0.0
    end: float = 0.0  # when the handler finished (the body sent or the connection gone)
    peer: str = ""  # the client's address


@dataclass
class Stats:
    connections: int = 0
    requests: list[Logged] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, path_prefix: str = "") -> int:
        with self.lock:
            return sum(1 for r in self.requests if r.path.startswith(path_prefix))

    def most_at_once(self, key_prefix: str, grace: float = 0.0) -> int:
        """The most requests whose key starts with `key_prefix` served at one moment. A response
        its client closed early ends here only at the handler's next write: `grace` is taken
        off each one's end."""
        with self.lock:
            mine = [r for r in self.requests if r.query.get("key", "").startswith(key_prefix)]
            spans = [(r.at, max(r.at, (r.end or float("inf")) - grace)) for r in mine]
        edges = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        most = now = 0
        for _, step in edges:
            now += step
            most = max(most, now)
        return most

    def started(self, prefix: str) -> list[float]:
        """When each request whose ?key= starts with `prefix` arrived, in order."""
        with self.lock:
            return [r.at for r in self.requests if r.query.get("key", "").startswith(prefix)]

    def ranges(self, key: str, size: int) -> list[tuple[int, int] | None]:
        """The byte ranges asked with ?key=<key>, in order: [start, end), or None for the whole
        body (`size`: where an open range ends)."""
        out: list[tuple[int, int] | None] = []
        for r in self.for_key(key):
            value = r.headers.get("Range")
            if value is None:
                out.append(None)
                continue
            first, _, last = value.removeprefix("bytes=").partition("-")
            out.append((int(first), int(last) + 1 if last else size))
        return out

    def for_key(self, key: str) -> list[Logged]:
        """The requests made with ?key=<key>, in order."""
        with self.lock:
            return [r for r in self.requests if r.query.get("key") == key]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: OriginServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        stats = self.server.stats
        key = query.get("key", parts.path)
        logged = Logged("GET", parts.path, query, dict(self.headers.items()), time.monotonic())
        logged.peer = str(self.client_address[0])
        with stats.lock:
            stats.requests.append(logged)
            stats.hits[key] += 1
            hit = stats.hits[key]
        try:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                self._route(parts.path, query, hit)
        finally:
            logged.end = time.monotonic()

    def _route(self, path: str, q: dict[str, str], hit: int) -> None:
        if "redirect" in q and int(q["redirect"]) > 0:
            left = int(q["redirect"]) - 1
            nxt = q.get("to") if left == 0 and "to" in q else None
            if nxt is None:
                rest = "&".join(f"{k}={v}" for k, v in q.items() if k != "redirect")
                nxt = f"{path}?redirect={left}&{rest}"
            return self._send(302, b"", {"Location": nxt})
        if "flaky" in q and hit <= int(q["flaky"]):
            return self._send(int(q.get("fail", "503")), b"try again\n", self._retry_after(q))
        if "status" in q:
            return self._send(int(q["status"]), b"status\n", self._retry_after(q))
        if path.startswith("/bytes/"):
            return self._bytes(int(path.split("/")[2]), q, hit)
        if path.startswith("/files/") and self.server.files_dir is not None:
            return self._file(path[len("/files/") :])
        return self._send(404, b"not found\n")

    def _retry_after(self, q: dict[str, str]) -> dict[str, str]:
        return {"Retry-After": q["retry_after"]} if "retry_after" in q else {}

    def _file(self, name: str) -> None:
        root = self.server.files_dir
        assert root is not None
        path = (root / name).resolve()
        if root.resolve() not in path.parents or not path.is_file():
            return self._send(404, b"not found\n")
        ctype = "image/png" if name.endswith(".png") else "application/octet-stream"
        return self._send(200, path.read_bytes(), {"Content-Type": ctype})

    def _bytes(self, n: int, q: dict[str, str], hit: int) -> None:
        seed = q.get("seed", "0")
        etag = f'"{seed}-{n}"'
        headers = {"Content-Type": q.get("ctype", "application/octet-stream")}
        if "noetag" not in q:
            headers["ETag"] = etag
        if "nolm" not in q:
            headers["Last-Modified"] = LAST_MODIFIED
        for i in range(int(q.get("flood", "0"))):
            headers[f"X-Flood-{i}"] = "x" * 64
        if "endless" in q:
            return self._endless(headers)
        if "gzip" in q:
            headers["Content-Encoding"] = "gzip"
            return self._send(200, gzipped_zeros(n), headers)
        if self.headers.get("If-None-Match") == etag and "noetag" not in q:
            return self._send(304, b"", {"ETag": etag}, no_body=True)
        status, start, end = 200, 0, n
        rng = self.headers.get("Range")
        if rng and "norange" not in q and self._if_range_ok(etag):
            first, _, last = rng.removeprefix("bytes=").partition("-")
            start, end = int(first), min(n, int(last) + 1) if last.strip() else n
            if start >= n:
                return self._send(416, b"", {"Content-Range": f"bytes */{n}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{n}"
        data = body(n, seed) if status == 200 else body_range(n, seed, start, end)
        cut = int(q["cut"]) if "cut" in q and hit <= int(q.get("cut_times", "1000000")) else None
        if "drop_after" in q and hit <= int(q.get("drop_times", "1000000")):
            cut, start = int(q["drop_after"]), 0
        short = int(q["short"]) if "short" in q else None
        stalls = "stall" in q and hit <= int(q.get("stall_times", "1000000"))
        self._send(
            status,
            data,
            headers,
            cut=cut if cut is None else max(0, cut - start),
            reset="reset" in q or ("drop_after" in q and cut is not None),
            short=short,
            stall=float(q["stall"]) if stalls else 0,
            rate=float(q.get("rate", "0")),
            lengths=[q[k] for k in ("clen", "clen2") if k in q] or None,
            chunked="chunked" in q,
            hold=self.server.gate(q["hold"]) if "hold" in q else None,
        )

    def _held(self, data: bytes, hold: threading.Event) -> bytes:
        """Send the first half, then a byte every 0.25 s (an origin that answers, slowly) until
        `hold` is set; return what is left to send."""
        sent = len(data) // 2
        self.wfile.write(data[:sent])
        self.wfile.flush()
        while not (hold.wait(0.25) or self.server.stopping.is_set()) and sent < len(data) - 1:
            self.wfile.write(data[sent : sent + 1])
            self.wfile.flush()
            sent += 1
        return data[sent:]

    def _if_range_ok(self, etag: str) -> bool:
        cond = self.headers.get("If-Range")
        return cond is None or cond in (etag, LAST_MODIFIED)

    def _endless(self, headers: dict[str, str]) -> None:
        self.send_response(200)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Connection", "close")
        self.end_headers()
        block = _block("endless")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not self.server.stopping.is_set():
            self.wfile.write(block)
        self.close_connection = True

    def _write_chunked(self, data: bytes) -> None:
        for i in range(0, len(data), 65536):
            piece = data[i : i + 65536]
            self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        self.wfile.write(b"0\r\n\r\n")

    def _send(
        self,
        status: int,
        data: bytes,
        headers: dict[str, str] | None = None,
        *,
        no_body: bool = False,
        cut: int | None = None,
        reset: bool = False,
        short: int | None = None,
        stall: float = 0,
        rate: float = 0,
        lengths: list[str] | None = None,
        chunked: bool = False,
        hold: threading.Event | None = None,
    ) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        if lengths is not None:
            # Framing the client may not trust: end the exchange with the connection.
            for value in lengths:
                self.send_header("Content-Length", value)
            self.send_header("Connection", "close")
            self.close_connection = True
        elif not no_body and not chunked:
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if chunked:
            return self._write_chunked(data)
        if stall:
            self.server.stopping.wait(stall)
        if hold is not None and not no_body:
            data = self._held(data, hold)
        if short is not None:
            data, cut = data[:short], short
        if cut is not None:
            self.wfile.write(data[:cut])
            self.wfile.flush()
            if reset:  # a zero linger turns the close into a TCP reset
                time.sleep(0.05)  # the bytes reach the client before the reset overtakes them
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        if rate:
            step = max(1, int(rate / 20))
            for i in range(0, len(data), step):
                if self.server.stopping.is_set():
                    break
                self.wfile.write(data[i : i + step])
                self.wfile.flush()
                if i + step < len(data):  # the request ends with its last byte, not a pause later
                    time.sleep(step / rate)
            return
        if not no_body:
            self.wfile.write(data)


class OriginServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        files_dir: Path | None = None,
        family: socket.AddressFamily = socket.AF_INET,
    ) -> None:
        self.address_family = family
        self.stats = Stats()
        self.stopping = threading.Event()
        self.gates: dict[str, threading.Event] = {}
        self.files_dir = files_dir
        super().__init__((host, port), Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-body is what half of the modes are for: not an error."""

    def get_request(self) -> tuple[socket.socket, Any]:
        conn = super().get_request()
        # Headers and body go out in separate writes: without this, Nagle's algorithm holds the
        # body until the client's delayed ACK (~40 ms per response on Linux).
        conn[0].setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.stats.lock:
            self.stats.connections += 1
        return conn

    def gate(self, name: str) -> threading.Event:
        """The event `hold=<name>` responses wait for (dict.setdefault is atomic under the GIL)."""
        return self.gates.setdefault(name, threading.Event())

    def release(self, name: str) -> None:
        """Let every `hold=<name>` response, held or still to come, send the rest of its body."""
        self.gate(name).set()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"http://{host}:{port}"

    def start(self) -> OriginServer:
        threading.Thread(target=self.serve_forever, daemon=True, name="origin").start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()


def main() -> None:
    """`python -m tests.server [port] [files_dir]`: serve until interrupted."""
    import sys

    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8099
    files = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    server = OriginServer(port=port, files_dir=files).start()
    print(f"serving on {server.url} (pid {os.getpid()})", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
