"""What the soak submits: each download its own URL path (so the origin can tell transfers of one
download apart), a size from bytes to tens of MiB, and a case: a plain download or one of the
origin's faults, with the outcome that case is built to have."""

from __future__ import annotations

import random
from dataclasses import dataclass

from tests.server import body_sha256

MiB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    name: str
    query: str  # the origin's fault switches
    expect: str  # SUCCESS, or the start of the FAILURE message the case is built to cause
    weight: int
    wrong_sha: bool = False
    deadline: bool = False  # submitted with the run's deadline (soak.origin.Outages.deadline_s)


# Transient faults stay within the soak's retry budget (DOWNLOAD_MAX_RETRIES=6 in soak.run).
CASES = [
    Case("plain", "", "SUCCESS", 50),
    Case("cut once", "cut={cut}&cut_times=1", "SUCCESS", 8),
    Case("stall once", "stall=4&stall_times=1", "SUCCESS", 5),
    Case("503 twice", "flaky=2", "SUCCESS", 6),
    Case("429 Retry-After", "flaky=1&fail=429&retry_after=1", "SUCCESS", 5),
    Case("Range ignored after a cut", "cut={cut}&cut_times=1&norange=1", "SUCCESS", 4),
    Case("no validators, cut", "cut={cut}&cut_times=1&noetag=1&nolm=1", "SUCCESS", 3),
    Case("404", "status=404", "HTTP 404", 4),
    Case("500 forever", "status=500", "attempts over", 2),
    # Without validators: a short body with an ETag is resumed until it is whole, and succeeds.
    Case("short body forever", "short={cut}&noetag=1&nolm=1", "attempts over", 2),
    Case("sha256 mismatch", "", "sha256 mismatch", 2, wrong_sha=True),
    # Down for longer than the retry budget lasts, and for less than the deadline.
    Case("origin down for minutes, deadline", "down=1", "SUCCESS", 4, deadline=True),
]


@dataclass(frozen=True)
class Download:
    n: int
    case: Case
    size: int
    deadline: float | None = None  # seconds

    @property
    def key(self) -> str:
        return f"d{self.n}"

    @property
    def dest(self) -> str:
        return f"soak/{self.n % 97}/{self.key}.bin"

    @property
    def sha256(self) -> str:
        return body_sha256(self.size, self.key)

    def url(self, origin: str) -> str:
        query = self.case.query.format(cut=max(1, self.size // 3))
        extra = f"&{query}" if query else ""
        return f"{origin}/bytes/{self.size}/{self.key}?seed={self.key}&key={self.key}{extra}"

    def kwargs(self, origin: str) -> dict[str, object]:
        kwargs: dict[str, object] = {"url": self.url(origin), "dest": self.dest}
        if self.case.wrong_sha:
            kwargs["sha256"] = "0" * 64
        if self.deadline is not None:
            kwargs["deadline"] = self.deadline
        return kwargs


def size(rng: random.Random, big: int) -> int:
    """Mostly small files, some of a few MiB, a few of tens of MiB (`big` caps them)."""
    roll = rng.random()
    if roll < 0.6:
        return rng.randint(1, 64 * 1024)
    if roll < 0.9:
        return rng.randint(64 * 1024, 4 * MiB)
    return rng.randint(4 * MiB, big)


def plan(
    count: int, seed: int, big: int, plain: bool = False, deadline: float = 0
) -> list[Download]:
    """`count` downloads; with `plain`, all of the plain case and no larger than `big`. Those of
    a case with a deadline get `deadline` seconds."""
    rng = random.Random(seed)
    if plain:
        return [Download(n, CASES[0], rng.randint(1, big)) for n in range(count)]
    weights = [c.weight for c in CASES]
    downloads = []
    for n in range(count):
        case = rng.choices(CASES, weights)[0]
        downloads.append(Download(n, case, size(rng, big), deadline if case.deadline else None))
    return downloads
