"""How much `make bench` does: the full run or BENCH_QUICK=1, a smoke run."""

from __future__ import annotations

import os
from dataclasses import dataclass

KIB, MIB, GIB = 1024, 1024**2, 1024**3


@dataclass(frozen=True)
class Config:
    quick: bool
    many: int  # memory section: downloads of 16 KiB per variant
    batch: int  # memory section: downloads between two RSS samples
    large_bytes: int  # 1 GiB section: the body's size
    large_runs: int
    chunk_sizes: tuple[int, ...]  # 1 GiB and profile sections: DOWNLOAD_CHUNK_SIZE values compared
    small_files: int  # small-files section: files of 16 KiB per run
    small_runs: int
    profile_downloads: int  # profile section

    @classmethod
    def from_env(cls) -> Config:
        if os.environ.get("BENCH_QUICK", "") not in ("", "0"):
            return cls(True, 1000, 200, GIB, 1, (256 * KIB, MIB), 2000, 1, 1000)
        return cls(False, 5000, 250, GIB, 5, (64 * KIB, 256 * KIB, MIB, 4 * MIB), 2000, 5, 3000)
