"""The fleet's running totals in Redis that Flower's /metrics serves (worker/metrics.py): bytes
downloaded and children recycled, one hash field per worker."""

from __future__ import annotations

from typing import Any

from download_client.contract import DownloadResult

BYTES_KEY = "downloads:metrics:bytes"
RECYCLED_KEY = "downloads:metrics:recycled"


def received_bytes(result: Any) -> int:
    """Bytes a finished download received over the network in its last run."""
    if not isinstance(result, dict) or result.get("skipped"):
        return 0
    return max(0, int(result.get("size") or 0) - int(result.get("resumed_from") or 0))


def count_bytes_on(pipe: Any, result: DownloadResult) -> None:
    """Queue the count of a finished download's bytes on `pipe` (it rides with the download's
    last round trip)."""
    n = received_bytes(result)
    if n > 0:
        pipe.hincrby(BYTES_KEY, str(result.get("worker") or "unknown"), n)
