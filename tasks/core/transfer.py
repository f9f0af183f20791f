"""Stream one URL into one file with a given session: redirects checked hop by hop, resume with
Range + If-Range, bytes hashed on the way, size caps, and the file published only when complete.
A large body goes over several connections (tasks/core/segments.py), from the URL and its
mirrors (tasks/core/mirrors.py)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from download_client.arguments import DownloadRequest
from download_client.errors import PermanentError, TransientError
from tasks.core import mirrors, redirects, responses, segments
from tasks.core.bandwidth import Pacer
from tasks.core.disk import Space
from tasks.core.hashing import StreamHasher
from tasks.core.records import Record, attach
from tasks.core.storage import Ranges, Target, disk_error

# Called with the bytes so far, the expected total and the seconds held back by a bandwidth budget.
Progress = Callable[[int, int | None, float], None]
Gate = Callable[[str], None]  # called with each hop's URL before its request (origin slots)
Pacing = Callable[[str], Pacer | None]  # the bandwidth budgets of the URL a body comes from
RESUME_MIN_BYTES = 256 * 1024


@dataclass(frozen=True)
class Limits:
    connect_timeout: float
    read_timeout: float
    max_bytes: int
    chunk_size: int
    # How long a download's id stands for it (its result's life, DOWNLOAD_RESULT_EXPIRES): a
    # file its own earlier run published is taken as its outcome only while that lasts.
    id_lifetime: float = 7 * 24 * 3600.0
    # Segmented downloads (tasks/core/segments.py): connections for one body, the body's size
    # from which they are used, and the rate under which the first connection must run first.
    segments: int = 1
    segment_min: int = 64 * 1024 * 1024
    segment_below: int = 0

    @property
    def timeout(self) -> tuple[float, float]:
        return self.connect_timeout, self.read_timeout


@dataclass(frozen=True)
class Outcome:
    final_url: str
    path: str
    size: int
    sha256: str
    content_type: str | None
    content_encoding: str | None
    http_status: int | None
    resumed_from: int
    skipped: bool
    throttled_s: float = 0.0  # held back by bandwidth budgets
    sources: tuple[tuple[str, int, int], ...] = ()  # (url, bytes, requests) of each source


def download(
    session: requests.Session,
    request: DownloadRequest,
    root: Path,
    limits: Limits,
    on_progress: Progress = lambda done, total, held: None,
    last_attempt: bool = False,
    gate: Gate | None = None,
    download_id: str | None = None,
    pacing: Pacing | None = None,
    space: Space | None = None,
    spare: segments.Spare | None = None,
) -> Outcome:
    """Download `request.url` to `root / request.dest`, resuming what an earlier attempt left.
    On the last attempt a transient failure also drops the partial: no retry will resume it.
    With `space`, the body is written only as far as its disk reservation reaches; `spare`
    gives a segmented download's connections beyond the first their slots (or none)."""
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
                    content_encoding=None,
                    http_status=None,
                    resumed_from=0,
                    skipped=True,
                )
        try:
            net = _Net(session, limits, gate, pacing, spare, on_progress)
            return _transfer(net, request, target, download_id, space)
        except _Mismatch as exc:
            # Kept with its own sha256 attached until the failure is stored (drop_mismatch).
            raise PermanentError(str(exc)) from None
        except PermanentError:
            target.discard()  # a retry cannot help, so nothing will resume it
            raise
        except TransientError:
            if last_attempt:
                target.discard()
            raise


@dataclass(frozen=True)
class _Net:
    """How a download reaches its origins: the session, limits and the run's hooks."""

    session: requests.Session
    limits: Limits
    gate: Gate | None
    pacing: Pacing | None
    spare: segments.Spare | None
    on_progress: Progress

    def first(
        self, request: DownloadRequest, headers: dict[str, str]
    ) -> AbstractContextManager[tuple[requests.Response, str]]:
        """The download's first response (from a mirror where its URL fails before its body),
        and the URL asked."""

        def open_url(url: str, sent: dict[str, str]) -> AbstractContextManager[requests.Response]:
            return redirects.opened(self.session, url, sent, self.limits.timeout, self.gate)

        return mirrors.first_response(request, headers, open_url)


def _transfer(
    net: _Net,
    request: DownloadRequest,
    target: Target,
    download_id: str | None,
    space: Space | None,
) -> Outcome:
    limits = net.limits
    arrived = target.arrived_record()
    if arrived is not None and _meets(arrived, request, limits):
        published = _publish_arrived(target, request, arrived, download_id)
        if published is not None:
            return published
    elif arrived is not None and request.sha256:
        _known_mismatch(target, request, arrived, download_id)
    ranges = target.load_ranges()
    if ranges is not None:
        resumed = _resume_segments(net, request, target, ranges, download_id, space)
        if resumed is not None:
            return resumed
    validators = target.load_sidecar()
    offset = target.partial_size() if validators.validator else 0
    if not offset:
        target.discard()  # whatever is there cannot be resumed: start clean
    finished = None if offset else target.finished_record()
    if finished is not None and not _meets(finished, request, limits):
        finished = None  # a 304 must not stand for a file this request would refuse: fetch it
    if finished is not None and _published_for(finished, download_id, limits):
        return _already_published(request, finished)
    headers = {**request.headers, **_condition_headers(validators, offset, finished)}

    with net.first(request, headers) as (response, _):
        if response.status_code == 304 and finished is not None:
            return _unchanged(response.url, request.dest, finished)
        start, total, cap = _admit(response, request, target, limits, offset, space is None)
        record = _record_of(response, request.url)
        # Keep the validators beside the partial when the body is worth resuming; a small one is
        # fetched again whole, which saves a file write on every small download.
        resumable = bool(record.validator) and (total is None or total - start > RESUME_MIN_BYTES)
        if space is not None:
            # Not room for it: the response is dropped unread, and the partial stays as it is.
            space.reserve(start, total, resumable)
        connections = _connections(request, limits, record, start, total)
        if connections and total is not None and record.validator:
            f, hasher = target.open_partial(start)
            ranges = Ranges(total, record.validator, response.url, [(start, total)])
            return _segmented(net, request, target, f, ranges, (response, ranges.url), record,
                              segments.PrefixHash(f.fileno(), hasher, start), connections,
                              download_id)  # fmt: skip
        if resumable:
            target.save_sidecar(record)
        pace = net.pacing(response.url) if net.pacing is not None else None
        f, hasher = target.open_partial(start)
        try:
            done = _stream(response, f, hasher, start, total, cap, limits.chunk_size,
                           net.on_progress, pace, space)  # fmt: skip
        except BaseException as exc:
            f.close()
            # Without a saved validator the bytes can never be resumed; a permanent error means
            # nothing will try again.
            if isinstance(exc, PermanentError) or not resumable:
                target.discard()
            raise

    return _publish_body(target, request, record, response, download_id, f,
                         hasher.hexdigest(), done, total, start,
                         pace.held_s if pace is not None else 0.0,
                         ((response.url, done - start, 1),))  # fmt: skip


def _publish_body(
    target: Target,
    request: DownloadRequest,
    record: Record,
    response: requests.Response,
    download_id: str | None,
    f: Any,
    digest: str,
    done: int,
    total: int | None,
    start: int,
    held_s: float,
    sources: tuple[tuple[str, int, int], ...],
) -> Outcome:
    """Verify the body in the partial `f` (`done` bytes, from `start` on in this run), publish
    it, and say what this run did."""
    record.sha256 = _verify(f, target, request, record, digest, done, total, download_id)
    record.published_for = download_id
    target.publish(f, record)
    return Outcome(
        final_url=response.url,
        path=request.dest,
        size=done,
        sha256=record.sha256,
        content_type=record.content_type,
        content_encoding=record.content_encoding,
        http_status=response.status_code,
        resumed_from=start,
        skipped=False,
        throttled_s=round(held_s, 3),
        sources=sources,
    )


def _connections(
    request: DownloadRequest, limits: Limits, record: Record, start: int, total: int | None
) -> int:
    """How many connections fetch this body in segments: 0 for none (one stream, as always),
    1 to be able to switch to a mirror mid-body, up to DOWNLOAD_SEGMENTS for a large one."""
    if total is None or not record.validator or total - start <= RESUME_MIN_BYTES:
        return 0
    if limits.segments > 1 and total - start >= limits.segment_min:
        return limits.segments
    return 1 if request.mirrors else 0


def _segmented(
    net: _Net,
    request: DownloadRequest,
    target: Target,
    f: Any,
    ranges: Ranges,
    first: tuple[requests.Response, str],
    record: Record,
    hasher: segments.PrefixHash,
    connections: int,
    download_id: str | None,
) -> Outcome:
    """Fetch what `ranges` misses over several connections, the first's with an open response
    (and the source it came from); then verify and publish as a single stream would."""
    response, asked = first
    limits = net.limits
    missing = sum(b - a for a, b in ranges.missing)
    sources = mirrors.sources(request, ranges)
    options = segments.Options(connections, limits.chunk_size, limits.timeout,
                               limits.segment_below)  # fmt: skip
    fetch = segments.Fetch(f.fileno(), ranges.total, segments.pieces(ranges.missing, connections),
                           sources, options, net.session, net.pacing, net.spare,
                           ranged=True if response.status_code == 206 else None,
                           base=ranges.total - missing)  # fmt: skip

    def save(missing: list[tuple[int, int]]) -> None:
        # The bytes go to the disk before the list that says they are there: after a power
        # loss too, what it lists as present is.
        try:
            os.fdatasync(f.fileno())
        except OSError as exc:
            raise disk_error(exc, "syncing the partial file") from exc
        ranges.missing = missing
        target.save_ranges(ranges)

    try:
        target.save_ranges(ranges)
        source = next((s for s in sources if s.url == asked), sources[0])
        segments.run(fetch, (response, source), hasher, save, net.on_progress)
        digest = hasher.finish(ranges.total)
    except BaseException as exc:
        hasher.abandon()
        f.close()
        if isinstance(exc, PermanentError):
            target.discard()
        raise
    return _publish_body(target, request, record, response, download_id, f, digest,
                         ranges.total, ranges.total, ranges.total - missing, fetch.held_s,
                         segments.served(fetch))  # fmt: skip


def _resume_segments(
    net: _Net,
    request: DownloadRequest,
    target: Target,
    ranges: Ranges,
    download_id: str | None,
    space: Space | None,
) -> Outcome | None:
    """Resume a segmented partial, asking only for the ranges it misses; None when its origin
    no longer serves those bytes (the partial is dropped, and the body fetched whole)."""
    missing = sum(b - a for a, b in ranges.missing)
    limits = net.limits
    connections = limits.segments if limits.segments > 1 and missing >= limits.segment_min else 1
    piece = segments.pieces(ranges.missing, connections)[0]  # the first connection's
    first = piece.pos
    headers = {**request.headers, "Range": f"bytes={first}-{piece.end - 1}",
               "If-Range": ranges.validator}  # fmt: skip
    cap = min(limits.max_bytes, request.max_bytes or limits.max_bytes)
    f = target.open_segments(ranges) if ranges.total <= cap else None
    if f is None:  # a partial that is not what `ranges` says (or a body now over the cap)
        target.discard()
        return None
    try:
        with net.first(request, headers) as (response, asked):
            responses.raise_for_status(response, first)
            found = responses.content_range(response) if response.status_code == 206 else None
            if found != (first, piece.end - 1, ranges.total):
                f.close()
                target.discard()  # another body now: fetched whole
                return None
            if space is not None:
                space.reserve(ranges.total - missing, ranges.total, True)
            if asked == request.url:  # not a mirror: the saved validator was answered there
                ranges.url = asked = response.url
            record = _record_of(response, request.url)
            hasher = segments.PrefixHash(f.fileno())
            return _segmented(net, request, target, f, ranges, (response, asked), record,
                              hasher, connections, download_id)  # fmt: skip
    except BaseException:
        f.close()  # already closed where _segmented failed: closing again does nothing
        raise


def _meets(finished: Record, request: DownloadRequest, limits: Limits) -> bool:
    """The file already there passes this request's own checks (its sha256, its size cap)."""
    cap = min(limits.max_bytes, request.max_bytes or limits.max_bytes)
    if request.sha256 and finished.sha256 != request.sha256:
        return False
    return (finished.size or 0) <= cap


def _publish_arrived(
    target: Target, request: DownloadRequest, arrived: Record, download_id: str | None
) -> Outcome | None:
    """Publish the body an earlier run had whole and checked when it was killed, once its bytes
    hash to the sha256 it recorded then; None when they do not (it is fetched again)."""
    size = arrived.size or 0
    f, hasher = target.open_partial(size)
    digest = hasher.hexdigest()
    if digest != arrived.sha256:
        f.close()
        target.discard()
        return None
    arrived.published_for = download_id
    target.publish(f, arrived)
    return Outcome(
        final_url=arrived.final_url or request.url,
        path=request.dest,
        size=size,
        sha256=digest,
        content_type=arrived.content_type,
        content_encoding=arrived.content_encoding,
        http_status=arrived.status,
        resumed_from=size,
        skipped=False,
    )


def _published_for(finished: Record, download_id: str | None, limits: Limits) -> bool:
    """The file was published by an earlier run of this same download, within its id's life."""
    if download_id is None or finished.published_for != download_id:
        return False
    return time.time() - (finished.mtime_ns or 0) / 1e9 < limits.id_lifetime


def _already_published(request: DownloadRequest, finished: Record) -> Outcome:
    """What the earlier run that published the file would have reported: it was killed (or its
    SUCCESS was not stored) after the rename, so its message came back to this run."""
    size = finished.size or 0
    return Outcome(
        final_url=finished.final_url or request.url,
        path=request.dest,
        size=size,
        sha256=finished.sha256 or "",
        content_type=finished.content_type,
        content_encoding=finished.content_encoding,
        http_status=finished.status,
        resumed_from=size,
        skipped=False,
    )


def _unchanged(final_url: str, dest: str, finished: Record) -> Outcome:
    """The origin answered 304 to the finished file's validators: the file stands as it is."""
    return Outcome(
        final_url=final_url,
        path=dest,
        size=finished.size or 0,
        sha256=finished.sha256 or "",
        content_type=finished.content_type,
        content_encoding=finished.content_encoding,
        http_status=304,
        resumed_from=0,
        skipped=True,
    )


def _record_of(response: requests.Response, url: str) -> Record:
    return Record(
        url=url,
        etag=response.headers.get("ETag"),
        last_modified=response.headers.get("Last-Modified"),
        content_type=response.headers.get("Content-Type"),
        # Bodies are stored as sent (never decoded): the caller must know a gzip is a gzip.
        content_encoding=response.headers.get("Content-Encoding"),
        final_url=response.url,
        status=response.status_code,
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
    check_space: bool = True,
) -> tuple[int, int | None, int]:
    """Check the response before its body: status, where it starts, size cap, free disk (unless
    a disk reservation will). Return (start offset, expected total or None, the size cap)."""
    try:
        responses.raise_for_status(response, offset)
        start = responses.start_offset(response, offset)
    except TransientError:
        if offset:
            target.discard()  # the server disagrees about our partial: start over next time
        raise
    total = responses.expected_total(response, start)
    cap = min(limits.max_bytes, request.max_bytes or limits.max_bytes)
    if total is not None and total > cap:
        target.discard()
        raise PermanentError(f"the body is {total} bytes, over the {cap}-byte limit")
    if total is not None and check_space:
        target.check_free_space(total - start)
    return start, total, cap


def _verify(
    f: Any,
    target: Target,
    request: DownloadRequest,
    record: Record,
    digest: str,
    done: int,
    total: int | None,
    download_id: str | None,
) -> str:
    """The finished body is whole and, when a sha256 was given, the right one. A short body is
    not kept; a whole one that is not the one asked for is kept for its download, its own sha256
    attached, until the failure is stored (see _Mismatch)."""
    if total is not None and done != total:
        f.close()
        target.discard()
        raise TransientError(f"the body ended after {done} of {total} bytes")
    if request.sha256 and digest != request.sha256:
        mismatch = f"sha256 mismatch: expected {request.sha256}, got {digest}"
        if download_id is None:  # no download to keep it for
            f.close()
            target.discard()
            raise PermanentError(mismatch)
        record.sha256, record.kept_for = digest, download_id
        attach(f.fileno(), record)
        f.close()
        raise _Mismatch(mismatch)
    return digest


class _Mismatch(PermanentError):
    """A whole body that is not the one asked for. Its partial stays, its sha256 attached, until
    the task's FAILURE is stored (drop_mismatch): a run killed before that reads the verdict off
    the partial instead of fetching the body again to learn the same."""


def _known_mismatch(
    target: Target, request: DownloadRequest, arrived: Record, download_id: str | None
) -> None:
    """Raise the mismatch an earlier run of this download found, once the kept bytes still hash
    to what it recorded; else drop them (they are fetched again)."""
    if download_id is None or arrived.kept_for != download_id:
        target.discard()
        return
    f, hasher = target.open_partial(arrived.size or 0)
    with f:
        if hasher.hexdigest() == arrived.sha256:
            # Opening marked it in use (a new mtime): the record must say so, or neither the
            # next run nor drop_mismatch would take it for this verdict's body.
            attach(f.fileno(), arrived)
            raise _Mismatch(f"sha256 mismatch: expected {request.sha256}, got {arrived.sha256}")
    target.discard()


def drop_mismatch(root: Path, request: DownloadRequest) -> None:
    """Once a download's FAILURE is stored, the body a mismatch kept goes (nothing else is
    touched: a partial without a record, or one whose record matches, is not a mismatch's)."""
    if not request.sha256:
        return
    target = Target(root, request.dest, request.url)
    with target.locked():
        arrived = target.arrived_record()
        if arrived is not None and arrived.sha256 != request.sha256:
            target.discard()


def _stream(
    response: requests.Response,
    f: Any,
    hasher: Any,
    done: int,
    total: int | None,
    cap: int,
    chunk_size: int,
    on_progress: Progress,
    pace: Pacer | None = None,
    space: Space | None = None,
) -> int:
    """Copy the raw body (never decoded: no gzip can inflate here) to `f`, at the pace of its
    bandwidth budgets if it has any, never past its disk reservation; return the size."""
    raw = response.raw
    beside = StreamHasher(hasher)
    try:
        while True:
            chunk = raw.read1(chunk_size, decode_content=False)
            if not chunk:
                break
            done += len(chunk)
            if done > cap:
                raise PermanentError(f"the body passed the {cap}-byte limit")
            if space is not None and done > space.check_at:
                space.check(done)  # more room, or Busy (parked), before a byte goes past it
            beside.update(chunk)
            try:
                f.write(chunk)
            except OSError as exc:
                raise disk_error(exc, "writing the body") from exc
            if space is not None:
                space.done = done
            if pace is not None:
                pace(len(chunk))
                on_progress(done, total, pace.held_s)
            else:
                on_progress(done, total, 0.0)
    finally:
        beside.close()
        if pace is not None:
            pace.close()
    return done
