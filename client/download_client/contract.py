"""The public contract of the download service: the task's name and the keys of its result.
Services depend on these; they change only additively (see docs/contract.md)."""

from __future__ import annotations

from typing import TypedDict

# The name producers submit to; it never changes with module paths.
TASK_NAME = "downloads.fetch"

# The state of a download that waits without a worker process (docs/contract.md), and why:
# for a slot at its origin (parked), for a destination another download is writing, for a slot
# of its group's cap, or for room on the disk (a disk reservation).
WAITING = "WAITING"
WAITING_ORIGIN = "origin"
WAITING_DESTINATION = "destination"
WAITING_GROUP = "group"
WAITING_DISK = "disk"


class Served(TypedDict):
    """What one URL (the download's or a mirror) served: bytes written, requests made."""

    url: str
    bytes: int
    requests: int


class DownloadResult(TypedDict):
    """What a successful `downloads.fetch` returns (the result table in docs/contract.md)."""

    url: str
    final_url: str
    path: str
    size: int
    sha256: str
    content_type: str | None
    http_status: int | None
    attempts: int
    resumed_from: int
    skipped: bool
    elapsed_s: float
    worker: str | None
    content_encoding: str | None
    waited_s: float
    retried_s: float
    deadline: float | None
    throttled_s: float
    sources: list[Served]


RESULT_KEYS = tuple(DownloadResult.__annotations__)
