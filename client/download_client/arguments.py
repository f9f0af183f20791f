"""The task's arguments, checked before any connection is made. Each refusal is a PermanentError
whose message names the argument and the reason."""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from download_client.errors import PermanentError
from download_client.groups import DEFAULT_GROUP, check_group

ARGUMENTS = (
    "url", "dest", "sha256", "headers", "max_bytes", "callback_url", "deadline", "group",
    "mirrors",
)  # fmt: skip
MAX_MIRRORS = 8
MAX_URL_LENGTH = 8192
MAX_NAME_BYTES = 255
MAX_DEST_BYTES = 1024
PARTIAL_DIR = ".partial"  # the in-progress area under DOWNLOAD_DIR: never a destination
# Letters and digits of any script stay (readable names from non-ASCII URLs); the rest is `_`.
_UNSAFE_NAME_CHARS = re.compile(r"[^\w.-]+")
MAX_DEFAULT_STEM_BYTES = 160  # with the hash and an extension, well under MAX_NAME_BYTES
MAX_HEADERS = 50
MAX_HEADER_BYTES = 8192
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# Unicode whitespace (as str.isspace) and ASCII control characters: one scan of the URL.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f]")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 field-name
# Headers the downloader sets itself: a caller's value would break resume, sizes or routing.
OWNED_HEADERS = frozenset(
    h.lower()
    for h in (
        "Host",
        "Range",
        "If-Range",
        "Accept-Encoding",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "Keep-Alive",
        "Upgrade",
        "TE",
        "Trailer",
        "Proxy-Authorization",
        "Proxy-Connection",
        "If-None-Match",
        "If-Modified-Since",
        "Expect",
    )
)


@dataclass(frozen=True)
class Deadline:
    """Until when transient faults are retried: `seconds` after the download is first admitted
    by a worker, or `at` a point in time (epoch seconds)."""

    seconds: float | None = None
    at: float | None = None

    def end(self, now: float) -> float:
        """The deadline as epoch seconds, for a download first admitted at `now`."""
        return self.at if self.at is not None else now + (self.seconds or 0.0)


@dataclass(frozen=True)
class DownloadRequest:
    url: str
    dest: str
    sha256: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    max_bytes: int | None = None
    callback_url: str | None = None
    deadline: Deadline | None = None
    group: str = DEFAULT_GROUP
    mirrors: tuple[str, ...] = ()


def parse(
    args: tuple[Any, ...], kwargs: Mapping[str, Any], now: float | None = None
) -> DownloadRequest:
    """Turn a message's args/kwargs into a DownloadRequest, or raise PermanentError. With `now`
    (a producer checking before it submits), a deadline that has passed is refused too."""
    if len(args) > len(ARGUMENTS):
        raise PermanentError(
            f"at most {len(ARGUMENTS)} positional arguments: {', '.join(ARGUMENTS)}"
        )
    values = dict(zip(ARGUMENTS, args, strict=False))
    for name, value in kwargs.items():
        if name not in ARGUMENTS:
            raise PermanentError(
                f"unknown argument {name!r}; expected some of: {', '.join(ARGUMENTS)}"
            )
        if name in values:
            raise PermanentError(f"argument {name!r} given twice")
        values[name] = value
    if "url" not in values or values["url"] is None:
        raise PermanentError("url: required")
    url = check_url(values["url"])
    dest = values.get("dest")
    if dest is None:
        dest = default_dest(url)
    elif not isinstance(dest, str):
        raise PermanentError(f"dest: expected a string, got {type(dest).__name__}")
    valid_dest(dest)
    sha256 = _check_sha256(values.get("sha256"))
    return DownloadRequest(
        url=url,
        dest=dest,
        sha256=sha256,
        headers=_check_headers(values.get("headers")),
        max_bytes=_check_max_bytes(values.get("max_bytes")),
        callback_url=_check_callback_url(values.get("callback_url")),
        deadline=_check_deadline(values.get("deadline"), now),
        group=check_group(values.get("group")),
        mirrors=_check_mirrors(values.get("mirrors"), url, sha256),
    )


def _check_mirrors(value: Any, url: str, sha256: str | None) -> tuple[str, ...]:
    """Other URLs of the same bytes, each checked as `url` is; a sha256 must say which bytes."""
    if value is None or (isinstance(value, list | tuple) and not value):
        return ()
    if not isinstance(value, list | tuple):
        raise PermanentError(f"mirrors: expected a list of URLs, got {type(value).__name__}")
    if len(value) > MAX_MIRRORS:
        raise PermanentError(f"mirrors: at most {MAX_MIRRORS} URLs")
    if sha256 is None:
        raise PermanentError("mirrors: a sha256 is required with mirrors (it checks their bytes)")
    mirrors: list[str] = []
    for i, mirror in enumerate(value):
        try:
            checked = check_url(mirror)
        except PermanentError as exc:
            raise PermanentError(f"mirrors[{i}]: {str(exc).removeprefix('url: ')}") from None
        if checked != url and checked not in mirrors:
            mirrors.append(checked)
    return tuple(mirrors)


def _check_deadline(value: Any, now: float | None) -> Deadline | None:
    """Seconds (a positive number) or an ISO 8601 time with a time zone."""
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise PermanentError("deadline: expected a positive number of seconds")
        return Deadline(seconds=float(value))
    if not isinstance(value, str):
        raise PermanentError(
            "deadline: expected seconds (a number) or an ISO 8601 time (2026-12-08T18:00:00Z), "
            f"got {type(value).__name__}"
        )
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise PermanentError(
            f"deadline: {value[:40]!r} is not an ISO 8601 time (2026-12-08T18:00:00Z)"
        ) from None
    if when.tzinfo is None:
        raise PermanentError(
            f"deadline: {value[:40]!r} has no time zone (add Z for UTC, or an offset: +02:00)"
        )
    deadline = Deadline(at=when.timestamp())
    if now is not None:
        check_ahead(deadline, now)
    return deadline


def check_ahead(deadline: Deadline, now: float) -> None:
    """PermanentError when a deadline given as a time has already passed at `now`."""
    if deadline.at is not None and deadline.at <= now:
        raise PermanentError(f"deadline: {utc_text(deadline.at)} has already passed")


def deadline_from(kwargs: Mapping[str, Any], now: float) -> dict[str, Any]:
    """The arguments with a deadline in seconds turned into the time it ends, counted from `now`
    (a producer submitting): a worker counts seconds from when it first takes the download,
    and the time spent queued would not count."""
    seconds = kwargs.get("deadline")
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return dict(kwargs)
    return {**kwargs, "deadline": utc_text(math.ceil(now + seconds))}


def utc_text(epoch: float) -> str:
    """Epoch seconds as people and ISO 8601 read them: 2026-12-08T18:00:00Z."""
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_callback_url(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return check_url(value)
    except PermanentError as exc:
        raise PermanentError(f"callback_{exc}") from None


def check_url(url: Any) -> str:
    if not isinstance(url, str):
        raise PermanentError(f"url: expected a string, got {type(url).__name__}")
    if len(url) > MAX_URL_LENGTH:
        raise PermanentError(f"url: longer than {MAX_URL_LENGTH} characters")
    if _SPACE_OR_CONTROL.search(url):
        raise PermanentError("url: must not contain whitespace or control characters")
    if "\\" in url:
        # urlsplit reads http://a\@b/ as host b, urllib3 (which connects) as host a.
        raise PermanentError("url: must not contain a backslash")
    if not _encodes(url):
        raise PermanentError("url: must be valid Unicode (it holds a lone surrogate)")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise PermanentError(f"url: not a valid URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https"):
        if not parts.scheme:
            raise PermanentError("url: scheme must be http or https, and there is none")
        raise PermanentError(f"url: scheme must be http or https, not {parts.scheme!r}")
    if not parts.hostname:
        raise PermanentError("url: has no host")
    if "%" in parts.hostname:
        # urllib3 decodes it (a%2ecom is a.com.): the host we check must be the one dialled.
        raise PermanentError("url: the host must not be percent-encoded")
    if port == 0:
        raise PermanentError("url: port 0 is not a port")
    return url


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_sha256(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _SHA256.fullmatch(value):
        raise PermanentError("sha256: expected 64 hexadecimal digits")
    return value.lower()


def _check_max_bytes(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PermanentError("max_bytes: expected a positive integer")
    return value


def _check_headers(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PermanentError(f"headers: expected an object of strings, got {type(value).__name__}")
    if len(value) > MAX_HEADERS:
        raise PermanentError(f"headers: more than {MAX_HEADERS} headers")
    total = 0
    for name, val in value.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise PermanentError(f"headers: {name!r} is not a valid header name")
        if not isinstance(val, str):
            raise PermanentError(f"headers: the value of {name!r} must be a string")
        if any(c in val for c in "\r\n\x00"):
            raise PermanentError(f"headers: the value of {name!r} contains CR, LF or NUL")
        try:
            val.encode("latin-1")
        except UnicodeEncodeError:
            raise PermanentError(f"headers: the value of {name!r} is not Latin-1 text") from None
        if name.lower() in OWNED_HEADERS:
            raise PermanentError(f"headers: {name!r} is set by the downloader and cannot be given")
        total += len(name) + len(val.encode("utf-8", "surrogatepass"))
    if total > MAX_HEADER_BYTES:
        raise PermanentError(f"headers: more than {MAX_HEADER_BYTES} bytes in all")
    return dict(value)


def check_dest(dest: str) -> PurePosixPath:
    """A relative POSIX path naming a file inside DOWNLOAD_DIR, or PermanentError saying why not."""
    return PurePosixPath(valid_dest(dest))


def valid_dest(dest: str) -> str:
    """`dest` itself if it is a relative POSIX path naming a file inside DOWNLOAD_DIR (the text
    is its only spelling: no empty, `.` or `..` component), or PermanentError saying why not.
    Kept a string: pathlib interns each component, and the workers see a new name a download."""
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
    return dest


def default_dest(url: str) -> str:
    """A readable name from the URL's last path segment plus a short hash of the whole URL, so two
    URLs never share a destination: https://x/a/cat.jpg -> cat-<10 hex>.jpg. Letters of any
    script are kept (https://x/%E7%8C%AB.jpg -> 猫-<hex>.jpg); a name never starts with `-` or
    `.` (an option to the next command, a hidden file)."""
    segment = unquote(urlsplit(url).path.rstrip("/").rsplit("/", 1)[-1], errors="replace")
    segment = unicodedata.normalize("NFC", segment)
    name = _UNSAFE_NAME_CHARS.sub("_", segment).strip("._-") or "download"
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem or len(ext) > 10:
        stem, ext = name, ""
    stem = _cut(stem.rstrip("._-"), MAX_DEFAULT_STEM_BYTES) or "download"
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return f"{stem}-{digest}.{ext}" if ext else f"{stem}-{digest}"


def _cut(text: str, max_bytes: int) -> str:
    """`text` cut to at most `max_bytes` of UTF-8, never inside a character."""
    return text.encode("utf-8")[:max_bytes].decode("utf-8", "ignore")
