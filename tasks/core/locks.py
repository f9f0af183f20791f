"""flock on files that come and go: a lock file is unlinked by the holder that releases it, so
whoever gets the lock checks that the path still names the file it locked."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path


def lock_current(path: Path, flags: int, deadline: float, mode: int = 0o600) -> int | None:
    """Open `path` and flock it, trying until `deadline`; None if it is still held by then. The
    files locked here are only ever unlinked by a holder of their lock, so once the lock is ours
    the path must still name the file locked: if it names another (or nothing), the file was
    removed while we waited, and the path is opened again."""
    while True:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        current = False
        try:
            if not flock(fd, deadline):
                return None
            current = names(path, fd)
        finally:
            if not current:
                os.close(fd)
        if current:
            return fd


def flock(fd: int, deadline: float) -> bool:
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def names(path: Path, fd: int) -> bool:
    """True if `path` names the file open at `fd`."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
