"""Hashing beside the transfer gives the digest hashing in line gives, for small and large
bodies, and its thread never outlives the download, even one that fails."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest

from tasks.core.hashing import BESIDE_AFTER, StreamHasher


@pytest.mark.parametrize("size", [0, 1000, BESIDE_AFTER - 1, BESIDE_AFTER, 3 * BESIDE_AFTER + 7])
def test_the_digest_is_the_same_as_in_line(size: int) -> None:
    body = os.urandom(size)
    hasher = hashlib.sha256(b"resumed prefix")
    beside = StreamHasher(hasher)
    for i in range(0, size, 128 * 1024):
        beside.update(body[i : i + 128 * 1024])
    beside.close()
    assert hasher.hexdigest() == hashlib.sha256(b"resumed prefix" + body).hexdigest()


def test_the_thread_ends_with_a_failed_transfer() -> None:
    beside = StreamHasher(hashlib.sha256())
    with pytest.raises(ConnectionResetError):
        try:
            for _ in range(100):
                beside.update(os.urandom(128 * 1024))
            raise ConnectionResetError
        finally:
            beside.close()
    assert not [t for t in threading.enumerate() if t.name == "sha256"]
