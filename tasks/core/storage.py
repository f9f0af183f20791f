"""The disk side: destination rules, the hidden in-progress area, locks, atomic publish, clean-up.

Layout under DOWNLOAD_DIR:
    <dest>                   only ever a complete file, with its record (the URL it came from,
                             validators, digest) in the extended attribute user.downloads.record
    .partial/<key>.part      bytes received so far for one (url, dest) pair; flocked while in use
    .partial/<key>.json      the validators (ETag / Last-Modified) to resume that partial with
    .partial/<key>.ranges    instead of <key>.json, for a partial fetched in segments
                             (tasks/core/segments.py): its size, validator and the ranges still
                             missing (the file has holes where they go)
    .partial/locks           one byte of it per destination (at an offset from its hash), locked
                             by the one task writing that destination; the file stays
    .partial/volume          the volume's name for disk reservations (tasks/core/disk.py), with
                             DOWNLOAD_DISK_MARGIN set; the file stays
`.partial/` holds only what is in progress, `locks` and `volume`: a partial and its validators go
when it is published or discarded, and the sweep removes what a killed process left.
Directories on the way to <dest> are opened one at a time with O_NOFOLLOW, so a symlink planted
anywhere in the path cannot lead a write outside DOWNLOAD_DIR, even if it appears mid-download.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from download_client.arguments import PARTIAL_DIR, valid_dest
from download_client.errors import DestinationBusyError, PermanentError
from tasks.core.locks import lock_current, range_lock, release
from tasks.core.records import RECORD_XATTR, Record, attach

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
LOCKS = "locks"


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def disk_error(exc: OSError, what: str) -> PermanentError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PermanentError(f"disk full while {what}: {exc.strerror}")
    return PermanentError(f"cannot write the download ({what}): {exc.strerror}")


class Target:
    """One destination under a root and the in-progress files of one URL for it."""

    def __init__(self, root: Path, dest: str, url: str) -> None:
        self.root = root
        self.dest = valid_dest(dest)
        *self._dirs, self._name = self.dest.split("/")
        self.partial_dir = root / PARTIAL_DIR
        self.url = url
        # Names made for one download are plain strings: pathlib interns every component
        # (sys.intern), and a new name a download grows the interpreter's table of interned
        # strings in each child until it is rebuilt, in pages of the child's own (1.8 MiB a
        # child over 900 downloads).
        key = os.path.join(self.partial_dir, _key(url, dest))
        self._part = f"{key}.part"
        self._sidecar, self._sidecar_tmp = sidecars(self._part)
        self._ranges, self._ranges_tmp = f"{key}.ranges", f"{key}.ranges.tmp"
        self.locks_path = self.partial_dir / LOCKS
        self.lock_offset = int(_key(dest)[:15], 16)  # 60 bits: distinct names, distinct bytes
        # What this run saw missing from .partial/ while it held the destination's lock, so that
        # a small download does not unlink files it already knows are not there.
        self._no_partial = self._no_sidecar = self._no_ranges = False
        self._no_dest = False  # check_path found nothing at the destination

    @property
    def part_path(self) -> Path:
        return Path(self._part)

    @property
    def sidecar_path(self) -> Path:
        return Path(self._sidecar)

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: float = 0) -> Iterator[None]:
        """Exclusive use of the destination across processes and threads, waiting up to `wait`
        seconds; busy means retry later. The kernel releases the lock of a process that dies."""
        self._ensure_partial_dir()
        try:
            fd = range_lock(self.locks_path, self.lock_offset, time.monotonic() + wait)
        except OSError as exc:
            raise disk_error(exc, "locking the destination") from exc
        if fd is None:
            raise DestinationBusyError(f"another task is downloading to {self.dest} right now")
        try:
            yield
        finally:
            release(fd)

    def _ensure_partial_dir(self) -> None:
        try:
            try:
                os.mkdir(self.partial_dir, 0o700)
            except FileNotFoundError:  # the root first
                self.root.mkdir(parents=True, exist_ok=True)
                os.mkdir(self.partial_dir, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise disk_error(exc, "creating the in-progress area") from exc
        try:
            real = stat.S_ISDIR(os.lstat(self.partial_dir).st_mode)  # a symlink is not
        except OSError:
            real = False
        if not real:
            raise PermanentError(f"{self.partial_dir} must be a real directory")

    # -- the partial's validators ----------------------------------------------------------
    def load_sidecar(self) -> Record:
        try:
            with open(self._sidecar, "rb") as f:
                return Record.from_json(f.read())
        except FileNotFoundError:
            self._no_sidecar = True
            return Record()
        except OSError:
            return Record()

    def save_sidecar(self, record: Record) -> None:
        tmp = self._sidecar_tmp
        self._no_sidecar = False
        try:
            with open(tmp, "wb") as f:
                f.write(Record(etag=record.etag, last_modified=record.last_modified).to_json())
            os.replace(tmp, self._sidecar)
        except OSError as exc:
            raise disk_error(exc, "saving the download's validators") from exc

    # -- a segmented partial's ranges ------------------------------------------------------
    def load_ranges(self) -> Ranges | None:
        """What a segmented partial still misses, or None (no such partial, or a file that does
        not describe one: then nothing of it is trusted)."""
        try:
            with open(self._ranges, "rb") as f:
                return Ranges.from_json(f.read())
        except FileNotFoundError:
            self._no_ranges = True
            return None
        except OSError:
            return None

    def save_ranges(self, ranges: Ranges) -> None:
        """Written before any byte lands past the partial's contiguous prefix: from then on the
        partial is resumed by its ranges, never by its size (<key>.json goes)."""
        self._no_ranges = False
        try:
            with open(self._ranges_tmp, "wb") as f:
                f.write(ranges.to_json())
            os.replace(self._ranges_tmp, self._ranges)
        except OSError as exc:
            raise disk_error(exc, "saving the download's ranges") from exc
        if not self._no_sidecar:
            for sidecar in (self._sidecar, self._sidecar_tmp):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(sidecar)
            self._no_sidecar = True

    def open_segments(self, ranges: Ranges) -> Any | None:
        """The partial `ranges` describes, opened for writing at any offset as it is; None when
        there is none, or it is shorter than the bytes `ranges` says it holds."""
        try:
            fd = lock_current(self._part, os.O_RDWR, time.monotonic() + 10)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise disk_error(exc, "opening the partial file") from exc
        if fd is None:
            raise PermanentError("the partial file stayed locked by another process")
        start, end = ranges.missing[-1]
        present_to = ranges.total if end < ranges.total else start  # the end of its last bytes
        if os.fstat(fd).st_size < present_to:
            os.close(fd)
            return None
        os.utime(fd)
        return os.fdopen(fd, "r+b", buffering=0)

    # -- the partial file ------------------------------------------------------------------
    def partial_size(self) -> int:
        try:
            return os.stat(self._part).st_size
        except FileNotFoundError:
            return 0

    def open_partial(self, keep: int) -> tuple[Any, Any]:
        """Open the partial for appending after its first `keep` bytes (0 starts over), with a
        sha256 already fed those bytes so the digest covers the whole file."""
        hasher = hashlib.sha256()
        try:
            # Locked while open, so the sweep leaves it alone however old it looks.
            fd = lock_current(self._part, os.O_RDWR | os.O_CREAT, time.monotonic() + 10, 0o666)
            if fd is None:
                raise PermanentError("the partial file stayed locked by another process")
            self._no_partial = False
            if keep:
                os.utime(fd)  # in use again: not abandoned (truncating to 0 sets the time too)
            f = os.fdopen(fd, "r+b", buffering=0)
            if keep:
                remaining = keep
                while remaining:
                    block = f.read(min(remaining, 1 << 20))
                    if not block:
                        break
                    hasher.update(block)
                    remaining -= len(block)
            f.truncate(keep)
            f.seek(keep)
        except OSError as exc:
            raise disk_error(exc, "opening the partial file") from exc
        return f, hasher

    def check_free_space(self, needed: int) -> None:
        """Refuse before the body when the disk cannot hold it (a full disk fails anyway, but
        only after writing what fits)."""
        st = os.statvfs(self.partial_dir)
        free = st.f_bavail * st.f_frsize
        if needed > free:
            self.discard()
            raise PermanentError(
                f"disk full: the body needs {needed} bytes, {free} are free in {self.root}"
            )

    def discard(self) -> None:
        if self._no_partial and self._no_sidecar and self._no_ranges:
            return  # seen missing under the lock: nothing to remove
        # The part goes last: a list of ranges must never outlive the bytes it describes.
        for path in (self._ranges, self._ranges_tmp, self._sidecar, self._sidecar_tmp, self._part):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    # -- the destination -------------------------------------------------------------------
    @contextlib.contextmanager
    def _parent_fd(self, create: bool) -> Iterator[int]:
        """The destination's directory, walked from the root one component at a time with
        O_NOFOLLOW (creating missing ones when asked)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in self._dirs:
                try:
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(part, 0o755, dir_fd=fd)
                    nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise PermanentError(
                            f"dest: {part!r} on the way to {self.dest} is a symlink or a file, "
                            "not a directory"
                        ) from None
                    raise
                os.close(fd)
                fd = nxt
            yield fd
        finally:
            os.close(fd)

    def check_path(self) -> None:
        """Before any byte is fetched: refuse a destination whose existing directories include a
        symlink or a file, or that is a directory. publish() walks again (the path may change)."""
        try:
            with self._parent_fd(create=False) as parent:
                self._no_dest = self._refuse_directory(parent)
        except FileNotFoundError:
            self._no_dest = True  # missing directories are made at publish
        except OSError as exc:
            raise disk_error(exc, f"checking the way to {self.dest}") from exc

    def _refuse_directory(self, parent: int) -> bool:
        """Refuse a directory at the destination; True when nothing is there."""
        try:
            mode = os.stat(self._name, dir_fd=parent, follow_symlinks=False).st_mode
        except FileNotFoundError:
            return True
        if stat.S_ISDIR(mode):
            raise PermanentError(f"dest: {self.dest} is an existing directory")
        return False

    def existing_sha256(self) -> tuple[str, int] | None:
        """(sha256, size) of the regular file at the destination, or None if there is none."""
        if self._no_dest:
            return None
        try:
            with self._parent_fd(create=False) as parent:
                fd = os.open(self._name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except (OSError, PermanentError):
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            hasher = hashlib.file_digest(f, "sha256")
            return hasher.hexdigest(), f.tell()

    def finished_record(self) -> Record | None:
        """The record of the file at the destination if it came from this URL and has not been
        changed since (same size and mtime); None otherwise, or where there are no user xattrs.
        A destination check_path found empty stays so: this task holds its lock."""
        if self._no_dest:
            return None
        try:
            with self._parent_fd(create=False) as parent:
                fd = os.open(self._name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except (OSError, PermanentError):
            return None
        return _record_on(fd, self.url)

    def arrived_record(self) -> Record | None:
        """The record a run attached to its partial once the body was whole and checked, right
        before the fsync and rename that publish it. A run killed in between leaves it, so the
        next run publishes that body instead of fetching it again."""
        try:
            fd = os.open(self._part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            self._no_partial = True
            return None
        except OSError:
            return None
        return _record_on(fd, self.url)

    def publish(self, f: Any, record: Record | None = None) -> None:
        """fsync the finished partial, with its record attached, and rename it onto the
        destination in one step; then fsync the directory so the rename survives a crash."""
        try:
            if record is not None:
                attach(f.fileno(), record)
            os.fsync(f.fileno())
            if not self._no_ranges:
                # Before the rename: a list of ranges must never outlive its bytes, and a run
                # killed from here on publishes the partial by its record (arrived_record).
                for path in (self._ranges, self._ranges_tmp):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                self._no_ranges = True
            with self._parent_fd(create=True) as parent:
                self._refuse_directory(parent)
                # Renamed while still open: the partial's lock keeps the sweep off until then.
                os.replace(self._part, self._name, dst_dir_fd=parent)
                os.fsync(parent)
        except PermanentError:
            raise
        except OSError as exc:
            raise disk_error(exc, f"moving the file to {self.dest}") from exc
        finally:
            f.close()
        if self._no_sidecar:
            return  # none was read or written by this run
        for sidecar in (self._sidecar, self._sidecar_tmp):  # its partial is now the file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sidecar)


@dataclass
class Ranges:
    """A segmented partial: the body's size, the validator its ranges are asked with (and the
    URL it is of), and the ranges [start, end) still missing."""

    total: int
    validator: str
    url: str
    missing: list[tuple[int, int]]

    def to_json(self) -> bytes:
        return json.dumps({"total": self.total, "validator": self.validator, "url": self.url,
                           "missing": self.missing}).encode()  # fmt: skip

    @classmethod
    def from_json(cls, raw: bytes) -> Ranges | None:
        """The ranges in `raw` if they are well formed: sorted, apart, within the body."""
        try:
            data = json.loads(raw)
            total, validator, url = data["total"], data["validator"], data["url"]
            missing = [(int(a), int(b)) for a, b in data["missing"]]
        except (ValueError, KeyError, TypeError):
            return None
        if type(total) is not int or not isinstance(validator, str) or not isinstance(url, str):
            return None
        edges = [x for pair in missing for x in pair]
        if not validator or not missing or edges != sorted(edges) or edges[0] < 0:
            return None
        if edges[-1] > total or any(a >= b for a, b in missing):
            return None
        return cls(total, validator, url, missing)


def _record_on(fd: int, url: str) -> Record | None:
    """The record attached to the open file `fd` (closed here) if it came from `url` and the file
    has not changed since (same size and mtime); None otherwise, or where there are no user
    xattrs."""
    try:
        st = os.fstat(fd)
        record = Record.from_json(os.getxattr(fd, RECORD_XATTR))
    except OSError:  # ENODATA: none; ENOTSUP: the file system keeps no user xattrs
        return None
    finally:
        os.close(fd)
    if record.url != url or record.sha256 is None:
        return None
    unchanged = stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (
        record.size,
        record.mtime_ns,
    )
    return record if unchanged else None


def companions(part: str | Path) -> tuple[str, ...]:
    """Every file that goes with a partial: its validators or its ranges, and their temporary
    names while written."""
    key = os.fspath(part).removesuffix(".part")
    return (*sidecars(part), f"{key}.ranges", f"{key}.ranges.tmp")


def sidecars(part: str | Path) -> tuple[str, str]:
    """The validators file of a partial (`<key>.part`) and its temporary name while written."""
    key = os.fspath(part).removesuffix(".part")
    return f"{key}.json", f"{key}.json.tmp"
