"""Hashing a large body beside its transfer: sha256 runs at about the speed of the disk, so
hashing each chunk in line with reading and writing it adds its whole time to a large download.
hashlib releases the GIL for chunks of 2 KiB and more, so a thread can hash one chunk while the
download reads and writes the next; small bodies are hashed in line (a thread's start costs more
than their hashing)."""

from __future__ import annotations

import queue
import threading
from typing import Any

BESIDE_AFTER = 4 * 1024 * 1024  # bytes hashed in line before the thread takes over
_DEPTH = 4  # chunks in flight: the memory this costs is _DEPTH chunks at most


class StreamHasher:
    """Feeds `hasher` every chunk in order; `close()` waits until all are in it."""

    def __init__(self, hasher: Any) -> None:
        self.hasher, self.inline = hasher, 0
        self.chunks: queue.Queue[bytes | None] | None = None
        self.thread: threading.Thread | None = None

    def update(self, chunk: bytes) -> None:
        if self.chunks is not None:
            self.chunks.put(chunk)
            return
        self.hasher.update(chunk)
        self.inline += len(chunk)
        if self.inline >= BESIDE_AFTER:
            self.chunks = queue.Queue(_DEPTH)
            self.thread = threading.Thread(target=self._run, name="sha256", daemon=True)
            self.thread.start()

    def _run(self) -> None:
        assert self.chunks is not None
        while (chunk := self.chunks.get()) is not None:
            self.hasher.update(chunk)

    def close(self) -> None:
        """Every chunk given is in the hasher once this returns (also when the transfer
        failed: the thread never outlives its download)."""
        if self.chunks is not None and self.thread is not None:
            self.chunks.put(None)
            self.thread.join()
            self.chunks = self.thread = None
