"""Removing from `.partial/` what nobody will use (run periodically by worker/sweeper.py)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from download_client.arguments import PARTIAL_DIR
from tasks.core.locks import flock, names
from tasks.core.storage import companions

# A validators file is written just before its partial is created: one without a partial is an
# orphan only once it is older than this.
ORPHAN_GRACE = 60.0


def sweep_partials(root: Path, max_age: float, now: float | None = None) -> int:
    """Remove from .partial/ what nobody will use: partial files (with their validators) untouched
    for `max_age` seconds, validators whose partial is gone, and `<hash>.lock` files nobody holds
    (workers before `.partial/locks` made one per destination). Return how many files went. A
    partial or lock in use is flocked by its task and left alone."""
    partial_dir = root / PARTIAL_DIR
    now = time.time() if now is None else now
    removed = 0
    for part in partial_dir.glob("*.part"):
        removed += _remove_unlocked(part, lambda st: now - st.st_mtime >= max_age)
    for lock in partial_dir.glob("*.lock"):
        removed += _remove_unlocked(lock, lambda st: True)
    for sidecar in [
        *partial_dir.glob("*.json"),
        *partial_dir.glob("*.json.tmp"),
        *partial_dir.glob("*.ranges"),
        *partial_dir.glob("*.ranges.tmp"),
    ]:
        removed += _remove_orphan(sidecar, now)
    return removed


def _remove_unlocked(path: Path, abandoned: Callable[[os.stat_result], bool]) -> int:
    """Unlink `path` (a partial: with its validators) if nobody holds its flock and it is
    `abandoned`; taken and checked under the lock, as its users expect (`tasks.core.locks`)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        if not flock(fd, deadline=0) or not names(path, fd) or not abandoned(os.fstat(fd)):
            return 0
        removed = 0
        # A partial's companions go first: a list of ranges must never outlive its bytes.
        victims = [*companions(path), str(path)] if path.suffix == ".part" else [str(path)]
        for victim in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(victim)
                removed += 1
        return removed
    finally:
        os.close(fd)


def _remove_orphan(sidecar: Path, now: float) -> int:
    part = sidecar.with_name(sidecar.name.split(".", 1)[0] + ".part")
    try:
        if part.exists() or now - sidecar.stat().st_mtime < ORPHAN_GRACE:
            return 0
        sidecar.unlink()
    except FileNotFoundError:
        return 0
    return 1
