"""How much `make bench` does: the full run (issue 6's sizes) or BENCH_QUICK=1, a smoke run."""

from __future__ import annotations

import os
from dataclasses import dataclass

KIB, MIB, GIB = 1024, 1024**2, 1024**3


@dataclass(frozen=True)
class Config:
    quick: bool
    many: int  # part 1: downloads of 16 KiB per variant
    batch: int  # part 1: downloads between two RSS samples
    large_bytes: int  # part 2: the body's size
    large_runs: int
    chunk_sizes: tuple[int, ...]  # part 2/4: DOWNLOAD_CHUNK_SIZE values compared
    small_files: int  # part 3: files of 16 KiB per run
    small_runs: int
    profile_downloads: int  # part 4

    @classmethod
    def from_env(cls) -> Config:
        if os.environ.get("BENCH_QUICK", "") not in ("", "0"):
            return cls(True, 1000, 200, GIB, 1, (256 * KIB, MIB), 2000, 1, 1000)
        return cls(False, 5000, 250, GIB, 5, (64 * KIB, 256 * KIB, MIB, 4 * MIB), 2000, 5, 3000)
