"""Who downloads to a destination, fleet-wide: one claim per destination in Redis.

A claim names its holder (a task id) and the download's flight key (what changes the bytes: url,
dest, headers, sha256, max_bytes). It outlives one attempt, so a holder waiting between its own
retries keeps the destination; it expires on its own (the holder's hard time limit plus the
longest retry countdown) if the holder is lost. A finished holder leaves its result (under its
task id) for a while, and a task that waited for that holder with the same key takes it instead
of downloading again, whoever holds the destination by then. The ledger (tasks/core/ledger.py)
takes and settles claims in a run's round trips.

The destination's lock in `tasks.core.storage` stays the guarantee that one process writes a file
at a time; the claim is what lets everybody else wait without holding a worker process.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from download_client.arguments import DownloadRequest
from tasks.core.ledger import Claim


def flight_key(request: DownloadRequest) -> str:
    """What makes two downloads the same download: identical bytes for the same caller."""
    parts: list[Any] = [request.url, request.dest, sorted(request.headers.items())]
    parts += [request.sha256 or "", request.max_bytes or 0]
    return hashlib.sha256(json.dumps(parts).encode("utf-8", "surrogatepass")).hexdigest()


def claim(
    request: DownloadRequest, task_id: str, ttl_s: float, waited_for: str | None = None
) -> Claim:
    """`task_id`'s claim on the request's destination, kept `ttl_s` past its last renewal."""
    return Claim(request.dest, flight_key(request), task_id, int(ttl_s * 1000), waited_for)
