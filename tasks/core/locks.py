"""Locks between processes and threads on one machine.

- flock on files that come and go (a partial): such a file is unlinked by a holder of its lock,
  so whoever gets the lock checks that the path still names the file it locked.
- A byte of one file that stays (`range_lock`), for a lock per name without a file per name:
  creating and unlinking a file for every download costs an inode each time, and where ext4
  runs without a journal each new inode is searched for past every one freed in the last
  minutes (find_inode_bit / recently_deleted), the largest kernel cost of a small download."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

# struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid (0 for open file description
# locks), padded as the kernel lays it out on 64-bit machines.
_FLOCK = "hhqqi4x"


def lock_current(path: str | Path, flags: int, deadline: float, mode: int = 0o600) -> int | None:
    """Open `path` and flock it, trying until `deadline`; None if it is still held by then."""
    return _open_locked(path, flags, mode, lambda fd: flock(fd, deadline))


def flock(fd: int, deadline: float) -> bool:
    def attempt() -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    return _until(deadline, attempt)


def _open_locked(
    path: str | Path, flags: int, mode: int, take: Callable[[int], bool]
) -> int | None:
    """Open `path` and `take` a lock on it; None if `take` gives up. A file locked here is only
    ever unlinked or replaced by a holder of its lock, so once the lock is ours the path must
    still name the file locked: if it names another (or nothing), it is opened again."""
    while True:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        current = False
        try:
            if not take(fd):
                return None
            current = names(path, fd)
        finally:
            if not current:
                os.close(fd)
        if current:
            return fd


def _until(deadline: float, attempt: Callable[[], bool]) -> bool:
    """`attempt` until it succeeds or `deadline` (time.monotonic()) has passed."""
    while not attempt():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def names(path: str | Path, fd: int) -> bool:
    """True if `path` names the file open at `fd`."""
    try:
        here = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    there = os.fstat(fd)
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def range_lock(path: Path, offset: int, deadline: float) -> int | None:
    """Open `path` (made if missing) and take the byte at `offset` with an open file description
    lock (F_OFD_SETLK, Linux 3.15+): owned by this open file, so threads exclude each other as
    processes do, and released by the kernel when its process dies. Returns the file descriptor
    holding it (`release` it), None if still held by `deadline`."""
    want = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
    fd = _open_locked(path, os.O_RDWR | os.O_CREAT, 0o600, lambda fd: _set_lock(fd, want, deadline))
    if fd is not None:
        _held[fd] = offset
    return fd


def release(fd: int) -> None:
    """Let go of what `range_lock` took: unlocked first, so that a copy of the descriptor a
    fork made meanwhile (a child forked before its hook has run) holds nothing, then closed."""
    offset = _held.pop(fd, None)
    try:
        if offset is not None:
            unlock = struct.pack(_FLOCK, fcntl.F_UNLCK, os.SEEK_SET, offset, 1, 0)
            with contextlib.suppress(OSError):
                fcntl.fcntl(fd, fcntl.F_OFD_SETLK, unlock)
    finally:
        os.close(fd)


# The descriptors `range_lock` holds in this process, and their bytes. A lock lasts as long as
# any copy of its open file does: the worker's main process holds one for a moment (removing a
# revoked download's partial, in a thread) while it forks children, and a child that kept its
# copy would hold the destination if the main process died.
_held: dict[int, int] = {}


def _close_copies() -> None:
    for fd in list(_held):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held.clear()


os.register_at_fork(after_in_child=_close_copies)


def _set_lock(fd: int, want: bytes, deadline: float) -> bool:
    def attempt() -> bool:
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, want)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False

    return _until(deadline, attempt)
