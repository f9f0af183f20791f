"""What is known about a download besides its bytes: a response's validators (beside a partial,
to resume it) and, on a finished file, the URL it came from and what it holds, kept in the
file's extended attribute `user.downloads.record` (to ask the server whether it changed)."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass

RECORD_XATTR = "user.downloads.record"


@dataclass
class Record:
    """A response's validators (beside a partial, to resume it) and, on a finished file, the URL
    it came from and what it holds (to ask the server whether it changed). Never request headers."""

    url: str | None = None
    etag: str | None = None
    last_modified: str | None = None
    sha256: str | None = None
    size: int | None = None
    mtime_ns: int | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    # Where the body came from (after redirects) and its status: what a run that publishes a
    # body an earlier, killed run had whole reports in the result.
    final_url: str | None = None
    status: int | None = None
    # On a body kept because it is not the one asked for: the download that kept it, the only
    # one that trusts the verdict (another may find the origin serving a fixed body).
    kept_for: str | None = None
    # On a published file: the download whose run published it. A later run of that same
    # download (its message delivered again before its result was stored) reports the file
    # instead of fetching it again, even from an origin without validators.
    published_for: str | None = None

    @property
    def validator(self) -> str | None:
        """The value for If-Range: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
        if self.etag and not self.etag.startswith("W/"):
            return self.etag
        return self.last_modified

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Record:
        """The record in `raw`, or an empty one if it is not a record (anyone who can write the
        file can write its attributes too: nothing here is trusted to have the right types)."""
        try:
            data = json.loads(raw)
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()
        kept = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        ints = ("size", "mtime_ns", "status")
        for name, value in kept.items():
            wanted = int if name in ints else str
            if value is not None and (type(value) is not wanted):
                return cls()
        return cls(**kept)


def attach(fd: int, record: Record) -> None:
    """Store the record on the file itself, so it goes wherever the file goes and nothing is left
    in .partial/. Best effort: without user xattrs (some NFS and FUSE mounts: ENOTSUP) or room for
    them (a URL longer than ext4's one block: ENOSPC, E2BIG) the file is simply fetched whole the
    next time instead of asked about with a conditional request."""
    st = os.fstat(fd)
    record.size, record.mtime_ns = st.st_size, st.st_mtime_ns  # an xattr changes neither
    with contextlib.suppress(OSError):
        os.setxattr(fd, RECORD_XATTR, record.to_json())
