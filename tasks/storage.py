"""The disk side: destination rules, the hidden in-progress area, locks, atomic publish, clean-up.

Layout under DOWNLOAD_DIR:
    <dest>                       only ever a complete file
    .partial/<key>.part          bytes received so far for one (url, dest) pair
    .partial/<key>.json          validators (ETag / Last-Modified) and, once done, the file's record
    .partial/<dlock>.lock        held (flock) by the one task writing a destination
Directories on the way to <dest> are opened one at a time with O_NOFOLLOW, so a symlink planted
anywhere in the path cannot lead a write outside DOWNLOAD_DIR, even if it appears mid-download.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from tasks.errors import DestinationBusyError, PermanentError

PARTIAL_DIR = ".partial"
MAX_NAME_BYTES = 255
MAX_DEST_BYTES = 1024
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def check_dest(dest: str) -> PurePosixPath:
    """A relative POSIX path naming a file inside DOWNLOAD_DIR, or PermanentError saying why not."""
    if not dest:
        raise PermanentError("dest: must not be empty")
    if "\x00" in dest:
        raise PermanentError("dest: must not contain a NUL byte")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in dest):
        raise PermanentError("dest: must not contain control characters")
    if dest.startswith("/"):
        raise PermanentError("dest: must be relative to DOWNLOAD_DIR, not absolute")
    try:
        dest.encode("utf-8")
    except UnicodeEncodeError:
        # The file system call would raise it after the whole body was fetched.
        raise PermanentError("dest: must be valid Unicode (it holds a lone surrogate)") from None
    if dest.endswith("/"):
        raise PermanentError("dest: must name a file, not a directory (trailing '/')")
    if len(dest.encode("utf-8", "surrogatepass")) > MAX_DEST_BYTES:
        raise PermanentError(f"dest: longer than {MAX_DEST_BYTES} bytes")
    parts = dest.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise PermanentError(f"dest: {part!r} is not allowed as a path component")
        if len(part.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
            raise PermanentError(f"dest: a path component is longer than {MAX_NAME_BYTES} bytes")
    if parts[0] == PARTIAL_DIR:
        raise PermanentError(f"dest: {PARTIAL_DIR}/ is the in-progress area and not writable")
    return PurePosixPath(dest)


def default_dest(url: str) -> str:
    """A readable name from the URL's last path segment plus a short hash of the whole URL, so two
    URLs never share a destination: https://x/a/cat.jpg -> cat-<10 hex>.jpg"""
    segment = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1])
    name = _UNSAFE_NAME_CHARS.sub("_", segment).strip("._") or "download"
    stem, dot, ext = name[:80].rpartition(".")
    if not dot or not stem or len(ext) > 10:
        stem, ext = name[:80], ""
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return f"{stem}-{digest}.{ext}" if ext else f"{stem}-{digest}"


def _key(*parts: str) -> str:
    return hashlib.sha256("\x00".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:32]


def disk_error(exc: OSError, what: str) -> PermanentError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return PermanentError(f"disk full while {what}: {exc.strerror}")
    return PermanentError(f"cannot write the download ({what}): {exc.strerror}")


@dataclass
class Record:
    """What is known about one (url, dest) pair between attempts."""

    etag: str | None = None
    last_modified: str | None = None
    complete: bool = False
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    content_type: str | None = None

    @property
    def validator(self) -> str | None:
        """The value for If-Range: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified


class Target:
    """One destination under a root and the in-progress files of one URL for it."""

    def __init__(self, root: Path, dest: str, url: str) -> None:
        self.root = root
        self.dest = check_dest(dest)
        self.partial_dir = root / PARTIAL_DIR
        key = _key(url, dest)
        self.part_path = self.partial_dir / f"{key}.part"
        self.record_path = self.partial_dir / f"{key}.json"
        self.lock_path = self.partial_dir / f"{_key(dest)}.lock"

    # -- locking ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: float = 0) -> Iterator[None]:
        """Exclusive use of the destination across processes, waiting up to `wait` seconds;
        busy means retry later. The kernel releases the lock of a process that dies."""
        self._ensure_partial_dir()
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise DestinationBusyError(
                            f"another task is downloading to {self.dest} right now"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def _ensure_partial_dir(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.partial_dir, 0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise disk_error(exc, "creating the in-progress area") from exc
        if self.partial_dir.is_symlink() or not self.partial_dir.is_dir():
            raise PermanentError(f"{self.partial_dir} must be a real directory")

    # -- the record ------------------------------------------------------------------------
    def load_record(self) -> Record:
        try:
            data: dict[str, Any] = json.loads(self.record_path.read_text())
            return Record(**{k: v for k, v in data.items() if k in Record.__dataclass_fields__})
        except (OSError, ValueError, TypeError):
            return Record()

    def save_record(self, record: Record) -> None:
        tmp = self.record_path.with_suffix(".json.tmp")
        try:
            tmp.write_text(json.dumps(record.__dict__))
            os.replace(tmp, self.record_path)
        except OSError as exc:
            raise disk_error(exc, "saving the download's record") from exc

    # -- the partial file ------------------------------------------------------------------
    def partial_size(self) -> int:
        try:
            return self.part_path.stat().st_size
        except FileNotFoundError:
            return 0

    def open_partial(self, keep: int) -> tuple[Any, Any]:
        """Open the partial for appending after its first `keep` bytes (0 starts over), with a
        sha256 already fed those bytes so the digest covers the whole file."""
        hasher = hashlib.sha256()
        try:
            fd = os.open(
                self.part_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666
            )
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
        for path in (self.part_path, self.record_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # -- the destination -------------------------------------------------------------------
    @contextlib.contextmanager
    def _parent_fd(self, create: bool) -> Iterator[int]:
        """The destination's directory, walked from the root one component at a time with
        O_NOFOLLOW (creating missing ones when asked)."""
        fd = os.open(self.root, _DIR_FLAGS)
        try:
            for part in self.dest.parts[:-1]:
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
                self._refuse_directory(parent)
        except FileNotFoundError:
            pass  # missing directories are made at publish
        except OSError as exc:
            raise disk_error(exc, f"checking the way to {self.dest}") from exc

    def _refuse_directory(self, parent: int) -> None:
        if _is_dir_at(parent, self.dest.name):
            raise PermanentError(f"dest: {self.dest} is an existing directory")

    def existing_sha256(self) -> tuple[str, int] | None:
        """(sha256, size) of the regular file at the destination, or None if there is none."""
        try:
            with self._parent_fd(create=False) as parent:
                fd = os.open(
                    self.dest.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent
                )
        except (OSError, PermanentError):
            return None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            hasher = hashlib.file_digest(f, "sha256")
            return hasher.hexdigest(), f.tell()

    def existing_stat(self) -> os.stat_result | None:
        try:
            with self._parent_fd(create=False) as parent:
                return os.stat(self.dest.name, dir_fd=parent, follow_symlinks=False)
        except (OSError, PermanentError):
            return None

    def publish(self, f: Any) -> os.stat_result:
        """fsync the finished partial and rename it onto the destination in one step; then fsync
        the directory so the rename survives a crash."""
        try:
            os.fsync(f.fileno())
            f.close()
            with self._parent_fd(create=True) as parent:
                self._refuse_directory(parent)
                os.replace(self.part_path, self.dest.name, dst_dir_fd=parent)
                os.fsync(parent)
                return os.stat(self.dest.name, dir_fd=parent, follow_symlinks=False)
        except PermanentError:
            raise
        except OSError as exc:
            raise disk_error(exc, f"moving the file to {self.dest}") from exc


def _is_dir_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def sweep_partials(root: Path, max_age: float, now: float | None = None) -> int:
    """Remove partial files (and their records) untouched for `max_age` seconds; return how many.
    A download in progress touches its partial with every chunk, so it is never this old."""
    partial_dir = root / PARTIAL_DIR
    now = time.time() if now is None else now
    removed = 0
    for part in partial_dir.glob("*.part"):
        try:
            if now - part.stat().st_mtime < max_age:
                continue
            part.unlink()
            part.with_suffix(".json").unlink(missing_ok=True)
            removed += 1
        except FileNotFoundError:
            continue
    return removed
