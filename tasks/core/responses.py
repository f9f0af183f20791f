"""Reading a response's head: whether its status is worth a retry, when to retry (Retry-After),
where its body starts (Content-Range) and how long it is (Content-Length)."""

from __future__ import annotations

import email.utils
import re
import time

import requests

from download_client.errors import PermanentError, TransientError
from tasks.core.failures import where

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DIGITS = re.compile(r"[0-9]+")


def raise_for_status(response: requests.Response, offset: int) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    reason = f" {response.reason}" if response.reason else ""
    said = f"HTTP {status}{reason} from {where(response.url)}"
    if status in RETRY_STATUSES or (status == 416 and offset):
        raise TransientError(said, _retry_after(response))
    raise PermanentError(said)


def _retry_after(response: requests.Response) -> float | None:
    """Retry-After as seconds from now; it may be a number of seconds or an HTTP date."""
    value = response.headers.get("Retry-After", "").strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def start_offset(response: requests.Response, offset: int) -> int:
    """Where this body starts in the file: the resume offset for a matching 206, else 0."""
    if response.status_code != 206:
        return 0
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not offset or not match or int(match.group(1)) != offset:
        raise TransientError("the server answered a range we did not ask for; starting over")
    return offset


def content_range(response: requests.Response) -> tuple[int, int, int | None] | None:
    """(first byte, last byte, the whole body's size or None) of a 206's Content-Range."""
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if match is None:
        return None
    size = None if match.group(3) == "*" else int(match.group(3))
    return int(match.group(1)), int(match.group(2)), size


def expected_total(response: requests.Response, start: int) -> int | None:
    length = content_length(response)
    return None if length is None else start + length


def content_length(response: requests.Response) -> int | None:
    """The body's length, or None without one. Chunked framing overrides Content-Length (urllib3
    then ignores it). Any other value than digits, repeated identically at most, leaves the body's
    end unknown (RFC 9112 6.3): urllib3 would read a negative or garbled one to the connection's
    close and call that complete, so it is refused here."""
    value = response.headers.get("Content-Length")
    if value is None or getattr(response.raw, "chunked", False):
        return None
    lengths = {part.strip() for part in value.split(",")}
    if len(lengths) != 1 or not all(_DIGITS.fullmatch(n) for n in lengths):
        raise PermanentError(
            f"the server's response is malformed: {f'invalid Content-Length {value[:40]!r}'}"
        )
    return int(lengths.pop())
