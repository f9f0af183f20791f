"""A TCP proxy between a Redis client and Redis that freezes the moment a chosen command has
gone through: after forwarding the first command that contains `trigger`, it forwards nothing
more to Redis on any connection, and tells the test once Redis's reply has reached the client.
What the client sends next (kombu's record of the message it took) never arrives."""

from __future__ import annotations

import contextlib
import socket
import threading


class FreezingProxy:
    def __init__(self, redis_port: int, trigger: bytes) -> None:
        self.redis_port, self.trigger = redis_port, trigger
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self.replied = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.redis_port))
            except OSError:  # Redis is down (the test killed it): the client sees a closed link
                _close(client)
                continue
            self.sockets += [client, upstream]
            armed = threading.Event()
            threading.Thread(target=self._up, args=(client, upstream, armed), daemon=True).start()
            threading.Thread(target=self._down, args=(upstream, client, armed), daemon=True).start()

    def _up(self, client: socket.socket, upstream: socket.socket, armed: threading.Event) -> None:
        while data := _recv(client):
            if self.frozen.is_set():
                continue  # swallowed: it never reaches Redis
            upstream.sendall(data)
            if self.trigger in data.upper():
                armed.set()
                self.frozen.set()
        _close(upstream)

    def _down(self, upstream: socket.socket, client: socket.socket, armed: threading.Event) -> None:
        while data := _recv(upstream):
            client.sendall(data)
            if armed.is_set():
                self.replied.set()
        _close(client)

    def close(self) -> None:
        _close(self.listener)
        for s in self.sockets:
            _close(s)


def _recv(s: socket.socket) -> bytes:
    try:
        return s.recv(65536)
    except OSError:
        return b""


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
