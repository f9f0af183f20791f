"""Stream one URL into one file with a given session: redirects checked hop by hop, resume with
Range + If-Range, bytes hashed on the way, size caps, and the file published only when complete."""

from __future__ import annotations

import contextlib
import email.utils
import http.client
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import urllib3.exceptions

from tasks.arguments import DownloadRequest, check_url
from tasks.errors import PermanentError, TransientError
from tasks.redact import redact_url
from tasks.storage import Record, Target, disk_error

Progress = Callable[[int, int | None], None]
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
MAX_REDIRECTS = 10
RESUME_MIN_BYTES = 256 * 1024
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DIGITS = re.compile(r"[0-9]+")
# Errors of the network and of a body cut short; the download may work when tried again.
_NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


@dataclass(frozen=True)
class Limits:
    connect_timeout: float
    read_timeout: float
    max_bytes: int
    chunk_size: int


@dataclass(frozen=True)
class Outcome:
    final_url: str
    path: str
    size: int
    sha256: str
    content_type: str | None
    http_status: int | None
    resumed_from: int
    skipped: bool


def download(
    session: requests.Session,
    request: DownloadRequest,
    root: Path,
    limits: Limits,
    on_progress: Progress = lambda done, total: None,
    last_attempt: bool = False,
) -> Outcome:
    """Download `request.url` to `root / request.dest`, resuming what an earlier attempt left.
    On the last attempt a transient failure also drops the partial: no retry will resume it."""
    target = Target(root, request.dest, request.url)
    with target.locked():
        target.check_path()
        if request.sha256:
            existing = target.existing_sha256()
            if existing and existing[0] == request.sha256:
                return Outcome(
                    final_url=request.url,
                    path=request.dest,
                    size=existing[1],
                    sha256=existing[0],
                    content_type=None,
                    http_status=None,
                    resumed_from=0,
                    skipped=True,
                )
        try:
            return _transfer(session, request, target, limits, on_progress)
        except PermanentError:
            target.discard()  # a retry cannot help, so nothing will resume it
            raise
        except TransientError:
            if last_attempt:
                target.discard()
            raise


def _transfer(
    session: requests.Session,
    request: DownloadRequest,
    target: Target,
    limits: Limits,
    on_progress: Progress,
) -> Outcome:
    validators = target.load_sidecar()
    offset = target.partial_size() if validators.validator else 0
    if not offset:
        target.discard()  # whatever is there cannot be resumed: start clean
    finished = None if offset else target.finished_record()
    headers = {**request.headers, **_condition_headers(validators, offset, finished)}

    with _get(session, request.url, headers, limits) as response:
        if response.status_code == 304 and finished is not None:
            return Outcome(
                final_url=response.url,
                path=request.dest,
                size=finished.size or 0,
                sha256=finished.sha256 or "",
                content_type=finished.content_type,
                http_status=304,
                resumed_from=0,
                skipped=True,
            )
        start, total, cap = _admit(response, request, target, limits, offset)
        new_record = Record(
            url=request.url,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
            content_type=response.headers.get("Content-Type"),
        )
        # Keep the validators beside the partial when the body is worth resuming; a small one is
        # fetched again whole, which saves a file write on every small download.
        resumable = bool(new_record.validator) and (
            total is None or total - start > RESUME_MIN_BYTES
        )
        if resumable:
            target.save_sidecar(new_record)
        f, hasher = target.open_partial(start)
        try:
            done = _stream(response, f, hasher, start, total, cap, limits.chunk_size, on_progress)
        except PermanentError:
            f.close()
            target.discard()
            raise
        except BaseException:
            f.close()
            if not resumable:
                target.discard()  # without a saved validator the bytes can never be resumed
            raise

    new_record.sha256 = _verify(f, target, request, hasher.hexdigest(), done, total)
    target.publish(f, new_record)
    return Outcome(
        final_url=response.url,
        path=request.dest,
        size=done,
        sha256=new_record.sha256,
        content_type=new_record.content_type,
        http_status=response.status_code,
        resumed_from=start,
        skipped=False,
    )


def _condition_headers(validators: Record, offset: int, finished: Record | None) -> dict[str, str]:
    """Range + If-Range to resume a partial, or the validators of the finished file to ask
    whether it changed."""
    if offset:
        return {"Range": f"bytes={offset}-", "If-Range": validators.validator or ""}
    headers = {}
    if finished is not None and finished.etag:
        headers["If-None-Match"] = finished.etag
    if finished is not None and finished.last_modified:
        headers["If-Modified-Since"] = finished.last_modified
    return headers


def _admit(
    response: requests.Response,
    request: DownloadRequest,
    target: Target,
    limits: Limits,
    offset: int,
) -> tuple[int, int | None, int]:
    """Check the response before its body: status, where it starts, size cap, free disk.
    Return (start offset, expected total or None, the size cap)."""
    try:
        _raise_for_status(response, offset)
        start = _start_offset(response, offset)
    except TransientError:
        if offset:
            target.discard()  # the server disagrees about our partial: start over next time
        raise
    total = _expected_total(response, start)
    cap = min(limits.max_bytes, request.max_bytes or limits.max_bytes)
    if total is not None and total > cap:
        target.discard()
        raise PermanentError(f"the body is {total} bytes, over the {cap}-byte limit")
    if total is not None:
        target.check_free_space(total - start)
    return start, total, cap


def _verify(
    f: Any, target: Target, request: DownloadRequest, digest: str, done: int, total: int | None
) -> str:
    """The finished body is whole and, when a sha256 was given, the right one; else nothing of
    it is kept."""
    if total is not None and done != total:
        f.close()
        target.discard()
        raise TransientError(f"the body ended after {done} of {total} bytes")
    if request.sha256 and digest != request.sha256:
        f.close()
        target.discard()
        raise PermanentError(f"sha256 mismatch: expected {request.sha256}, got {digest}")
    return digest


@contextlib.contextmanager
def _get(
    session: requests.Session, url: str, headers: dict[str, str], limits: Limits
) -> Iterator[requests.Response]:
    """GET with redirects followed here, so each hop's URL is checked and the caller's headers
    go only to the origin they were given for (aria2#1176)."""
    origin = _origin(url)
    caller = {k: v for k, v in headers.items() if k not in ("Range", "If-Range")}
    ours = {k: v for k, v in headers.items() if k in ("Range", "If-Range")}
    for _ in range(MAX_REDIRECTS + 1):
        hop_headers = {**caller, **ours} if _origin(url) == origin else ours
        response = _send(session, url, hop_headers, limits)
        if not response.is_redirect:
            try:
                yield response
            except _NETWORK_ERRORS as exc:
                raise TransientError(
                    f"connection failed during the body: {_describe(exc)}"
                ) from None
            finally:
                response.close()
            return
        location = response.headers["Location"]
        response.close()
        try:
            url = check_url(urljoin(response.url, location))
        except PermanentError as exc:
            raise PermanentError(f"redirect refused: {exc}") from None
    raise PermanentError(f"more than {MAX_REDIRECTS} redirects")


def _send(
    session: requests.Session, url: str, headers: dict[str, str], limits: Limits
) -> requests.Response:
    response = _request(session, url, headers, limits)
    try:
        _content_length(response)
    except PermanentError:
        response.close()
        raise
    return response


def _request(
    session: requests.Session, url: str, headers: dict[str, str], limits: Limits
) -> requests.Response:
    try:
        return session.get(
            url,
            headers=headers,
            stream=True,
            allow_redirects=False,
            timeout=(limits.connect_timeout, limits.read_timeout),
        )
    except requests.exceptions.InvalidHeader as exc:
        conflict = _length_conflict(exc)
        if conflict is not None:
            raise PermanentError(f"the server's response is malformed: {conflict}") from None
        raise PermanentError(f"request refused: {_describe(exc)}") from None
    except (
        requests.exceptions.InvalidURL,
        requests.exceptions.InvalidSchema,
        requests.exceptions.MissingSchema,
    ) as exc:
        raise PermanentError(f"request refused: {_describe(exc)}") from None
    except _NETWORK_ERRORS as exc:
        malformed = _malformed_head(exc)
        if malformed is not None:
            raise PermanentError(f"the server's response is malformed: {malformed}") from None
        raise TransientError(f"cannot reach {redact_url(url)}: {_describe(exc)}") from None


def _length_conflict(exc: requests.exceptions.InvalidHeader) -> str | None:
    """urllib3 refuses two different Content-Length values itself, before we see the headers
    ("Content-Length contained multiple unmatching values (10, 5)"), and requests reports it as
    an InvalidHeader, the error it also uses for a bad header of ours: tell the two apart."""
    cause = exc.__context__
    if not isinstance(cause, urllib3.exceptions.InvalidHeader):
        return None
    values = re.search(r"\((.*)\)$", str(cause))
    return _invalid_length(values.group(1)) if values else str(cause)


def _invalid_length(value: str) -> str:
    return f"invalid Content-Length {value[:40]!r}"


def _malformed_head(exc: BaseException) -> http.client.HTTPException | None:
    """http.client's refusal of a response head past its limits (over 100 header lines, a line
    over 64 KiB): the server answers the same way every time, so a retry cannot help. urllib3
    carries it as ProtocolError('Connection aborted.', <it>) inside MaxRetryError.reason."""
    todo: list[object] = [exc]
    for _ in range(16):  # a chain can loop
        if not todo:
            break
        seen = todo.pop()
        if not isinstance(seen, BaseException):
            continue
        if isinstance(seen, http.client.LineTooLong) or type(seen) is http.client.HTTPException:
            return seen
        todo += [seen.__cause__, seen.__context__, getattr(seen, "reason", None), *seen.args]
    return None


def _describe(exc: BaseException) -> str:
    """A short cause without the URL (which may hold a token) that requests puts in messages."""
    while exc.__context__ is not None and isinstance(exc, requests.RequestException):
        exc = exc.__context__
    name = type(exc).__name__
    text = str(exc)
    text = re.sub(r"https?://\S+", "<url>", text)
    text = re.sub(r"with url: \S+", "with url: <url>", text)  # urllib3's path and query
    text = re.sub(r"(url|host)='?[^,)']*'?", r"\1=<redacted>", text)
    return f"{name}: {text}"[:300]


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or (443 if scheme == "https" else 80)


def _raise_for_status(response: requests.Response, offset: int) -> None:
    status = response.status_code
    if status in (200, 206):
        return
    if status in RETRY_STATUSES or (status == 416 and offset):
        raise TransientError(f"HTTP {status} {response.reason}", _retry_after(response))
    raise PermanentError(f"HTTP {status} {response.reason}")


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


def _start_offset(response: requests.Response, offset: int) -> int:
    """Where this body starts in the file: the resume offset for a matching 206, else 0."""
    if response.status_code != 206:
        return 0
    match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
    if not offset or not match or int(match.group(1)) != offset:
        raise TransientError("the server answered a range we did not ask for; starting over")
    return offset


def _expected_total(response: requests.Response, start: int) -> int | None:
    length = _content_length(response)
    return None if length is None else start + length


def _content_length(response: requests.Response) -> int | None:
    """The body's length, or None without one. Chunked framing overrides Content-Length (urllib3
    then ignores it). Any other value than digits, repeated identically at most, leaves the body's
    end unknown (RFC 9112 6.3): urllib3 would read a negative or garbled one to the connection's
    close and call that complete, so it is refused here."""
    value = response.headers.get("Content-Length")
    if value is None or getattr(response.raw, "chunked", False):
        return None
    lengths = {part.strip() for part in value.split(",")}
    if len(lengths) != 1 or not all(_DIGITS.fullmatch(n) for n in lengths):
        raise PermanentError(f"the server's response is malformed: {_invalid_length(value)}")
    return int(lengths.pop())


def _stream(
    response: requests.Response,
    f: Any,
    hasher: Any,
    done: int,
    total: int | None,
    cap: int,
    chunk_size: int,
    on_progress: Progress,
) -> int:
    """Copy the raw body (never decoded: no gzip can inflate here) to `f`; return the size."""
    raw = response.raw
    while True:
        chunk = raw.read1(chunk_size, decode_content=False)
        if not chunk:
            break
        done += len(chunk)
        if done > cap:
            raise PermanentError(f"the body passed the {cap}-byte limit")
        hasher.update(chunk)
        try:
            f.write(chunk)
        except OSError as exc:
            raise disk_error(exc, "writing the body") from exc
        on_progress(done, total)
    return done
