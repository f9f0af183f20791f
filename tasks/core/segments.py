"""One large body fetched as several ranges at once, into one in-progress file at their offsets.

A download segments when its body is large (DOWNLOAD_SEGMENT_MIN), its origin has a strong
validator for If-Range and DOWNLOAD_SEGMENTS allows more than one connection. The first response
(a 200 from the start, or a 206 resuming) is the first connection's; one more connection asks for
the back half of what is left, and only once that is answered 206 with the range asked do the
others start, each taking the back half of the largest range still being fetched (as aria2 and
pypdl split). An origin that answers 200 to a range (it ignores Range) is never asked again: the
first connection reads on to the end, and no byte is written twice.

What is still missing is kept beside the partial (`<key>.ranges`, tasks/core/storage.py),
written before any byte lands past the contiguous prefix and then every second, so a run after
a SIGKILL asks only for the ranges it lists. The sha256 is fed the file's contiguous prefix as
it grows (read back from the page cache, not the disk), so the end costs only the tail.

Mirrors (other URLs for the same bytes, with a sha256 to check them) are sources beside the
main one: each connection takes the source with the fewest connections; a source that refuses
ranges, answers another size, fails MAX_FAILS times or runs at under 1/SLOW_RATIO of the best
one's rate is dropped for the others. Every source's request goes through the same session
(address checks), the same redirect rules and the same header rules as the main URL's."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from download_client.errors import DownloadError, PermanentError, TransientError
from download_client.redact import redact_url
from tasks.core import failures, redirects, responses
from tasks.core.bandwidth import Pacer
from tasks.core.failures import where
from tasks.core.storage import disk_error

log = logging.getLogger(__name__)

MIN_SPLIT = 4 * 1024 * 1024  # a range is split only when both halves keep at least this much
# What is missing is cut into pieces handed out in order, about 4 a connection, so the file's
# complete prefix (what the sha256 has been fed) trails the connections by a few pieces and the
# end costs little hashing.
MIN_PIECE, MAX_PIECE = 4 * 1024 * 1024, 16 * 1024 * 1024
MAX_FAILS = 3  # failures in a row that drop a source while another is left
LAST_FAILS = 8  # failures of the last source left in one attempt: the attempt ends (a retry)
SLOW_RATIO = 8  # a source under 1/8 of the best source's rate is dropped (when there are others)
SLOW_AFTER_S = 3.0  # a connection's rate counts once it has read this long
SAVE_EVERY_S = 1.0  # how often the missing ranges are written beside the partial
TICK_S = 0.25  # how often the coordinator reports progress and feeds the hash
HASH_BLOCK = 1024 * 1024
# Callers of `spare`: a slot for one more connection at a URL's origin, if one is free now (a
# function that gives it back), else None; the connection is then not opened.
Spare = Callable[[str], Callable[[], None] | None]
Pacing = Callable[[str], Pacer | None]
Progress = Callable[[int, int | None, float], None]


@dataclass(eq=False)
class Piece:
    """A range of the body: bytes [pos, end) still to fetch. `end` is lowered when another
    connection takes the range's tail; `owner` is the job writing it (only it may)."""

    pos: int
    end: int
    owner: Job | None = None


@dataclass(eq=False)
class Source:
    """One URL the body can come from, and what it served."""

    url: str
    headers: dict[str, str]
    if_range: str | None = None  # its own validator; None: a mirror, checked by the sha256
    own_slot: bool = False  # at the origin of the run's own slot: the first connection's
    bytes: int = 0
    requests: int = 0
    active: int = 0
    fails: int = 0  # in a row
    failed: int = 0  # in this attempt
    dropped: str | None = None  # why it is no longer asked
    slow: bool = False  # dropped for its rate: its connections stop reading too
    busy_s: float = 0.0  # seconds its connections spent reading, added up: rate per connection

    @property
    def rate(self) -> float:
        return self.bytes / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(frozen=True)
class Options:
    connections: int
    chunk_size: int
    timeout: tuple[float, float]
    # Segment only once the first connection has run a second under this rate (0: at once).
    slow_below: int = 0


@dataclass(eq=False)
class Job:
    piece: Piece
    start: int
    end: int
    source: Source
    split: bool  # the tail of another connection's piece, committed once answered 206


def pieces(missing: list[tuple[int, int]], connections: int) -> list[Piece]:
    """The missing ranges cut into pieces of about a quarter of a connection's share."""
    size = sum(b - a for a, b in missing)
    step = min(MAX_PIECE, max(MIN_PIECE, size // (4 * connections)))
    return [Piece(x, min(b, x + step)) for a, b in missing for x in range(a, b, step)]


@dataclass(eq=False)
class Fetch:
    """The ranges of one body being fetched, shared by its connections under one lock."""

    fd: int
    total: int
    pieces: list[Piece]
    sources: list[Source]
    options: Options
    session: requests.Session
    pacing: Pacing | None = None
    spare: Spare | None = None
    ranged: bool | None = None  # the main source answered a range with 206 (None: not asked)
    base: int = 0  # bytes in the file before this run
    done: int = 0  # bytes written by this run
    held_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Set when a piece is given back or `ranged` is decided: who waits for either looks again.
    changed: threading.Event = field(default_factory=threading.Event)
    stop: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    threads: list[threading.Thread] = field(default_factory=list)
    alive: int = 0
    finished: threading.Event = field(default_factory=threading.Event)  # no connection left
    started: float = field(default_factory=time.monotonic)

    # -- what is left ----------------------------------------------------------------------
    def missing(self) -> list[tuple[int, int]]:
        """The ranges not in the file yet, adjacent ones joined."""
        with self.lock:
            left = sorted((p.pos, p.end) for p in self.pieces if p.pos < p.end)
        joined: list[tuple[int, int]] = []
        for a, b in left:
            if joined and joined[-1][1] == a:
                joined[-1] = (joined[-1][0], b)
            else:
                joined.append((a, b))
        return joined

    def contiguous(self) -> int:
        """The end of the file's complete prefix."""
        with self.lock:
            return min((p.pos for p in self.pieces if p.pos < p.end), default=self.total)

    def _healthy(self) -> list[Source]:
        return [s for s in self.sources if s.dropped is None]

    def _source(self, exclude: set[int]) -> Source | None:
        """The healthy source with the fewest connections (the earliest given, between equals)."""
        found = [s for s in self._healthy() if id(s) not in exclude]
        if self.ranged is not True:
            found = found[:1]  # ranges are tried at the main source first
        return min(found, key=lambda s: s.active) if found else None

    def _next(self, exclude: set[int]) -> Job | None:
        """Under the lock: the first piece nobody writes, else the tail of the largest one being
        written (committed when its answer comes), else None."""
        source = self._source(exclude)
        if source is None:
            return None
        for piece in self.pieces:
            if piece.owner is None and piece.pos < piece.end:
                job = Job(piece, piece.pos, piece.end, source, split=False)
                piece.owner = job
                return job
        if self.ranged is False:
            return None
        margin = 2 * self.options.chunk_size  # past what its writer may be writing right now
        widest = max(self.pieces, key=lambda p: p.end - p.pos, default=None)
        if widest is None or widest.end - widest.pos < 2 * max(MIN_SPLIT, margin):
            return None
        mid = widest.pos + (widest.end - widest.pos) // 2
        return Job(widest, mid, widest.end, source, split=True)

    def _release(self, job: Job) -> None:
        """Under the lock: the job's piece, if it still holds it, goes back to be taken."""
        piece = job.piece
        if piece.owner is job:
            piece.owner = None
            if piece.pos < piece.end:
                self.changed.set()

    # -- connections -----------------------------------------------------------------------
    def start(self, first: tuple[requests.Response, Source] | None) -> None:
        """The first connection (with its response already open, if given); then the others at
        once where ranges are known to work, else one that asks for a range first."""
        self._launch(first, slot=False)
        if self.options.connections < 2:
            return
        if self.ranged:
            self._more()
        else:
            self._launch(None, slot=True, probe=first is not None)

    def _launch(
        self, first: tuple[requests.Response, Source] | None, slot: bool, probe: bool = False
    ) -> None:
        thread = threading.Thread(target=self._connection, args=(first, slot, probe),
                                  name=f"segment-{len(self.threads)}", daemon=True)  # fmt: skip
        with self.lock:
            self.alive += 1
        try:
            thread.start()
        except BaseException:
            with self.lock:
                self.alive -= 1
            raise
        self.threads.append(thread)

    def _more(self) -> None:
        """Ranges work: open the remaining connections."""
        for _ in range(self.options.connections - len(self.threads)):
            self._launch(None, slot=True)

    def _connection(
        self, first: tuple[requests.Response, Source] | None, slot: bool, probe: bool
    ) -> None:
        try:
            if first is not None:
                self._first(*first)
            elif probe and not self._proves_slow():
                return
            self._loop(slot)
        except BaseException as exc:  # the download fails as a whole: stop every connection
            with self.lock:
                if self.error is None:
                    self.error = exc
            self.stop.set()
        finally:
            with self.lock:
                self.alive -= 1
                if not self.alive:
                    self.finished.set()
            self.changed.set()

    def _first(self, response: requests.Response, source: Source) -> None:
        """The response the download opened with: read into the first missing piece."""
        with self.lock:
            piece = next(p for p in self.pieces if p.pos < p.end)
            job = Job(piece, piece.pos, piece.end, source, split=False)
            piece.owner = job
            source.active += 1
            source.requests += 1
        found = responses.content_range(response) if response.status_code == 206 else None
        reach = found[1] + 1 if found is not None else self.total
        try:
            self._read(job, response, reach)
            self._succeeded(job)
        except TransientError as exc:
            self._failed(job, str(exc), permanent=False)
        finally:
            response.close()  # what is left unread of it belongs to other connections now
            with self.lock:
                source.active -= 1
                self._release(job)

    def _proves_slow(self) -> bool:
        """With DOWNLOAD_SEGMENT_BELOW: the first connection ran under it for a second."""
        below = self.options.slow_below
        if not below:
            return True
        if self.stop.wait(1.0):
            return False
        with self.lock:
            rate = self.done / max(1e-3, time.monotonic() - self.started)
        return rate < below

    def _loop(self, slot: bool) -> None:
        """Take jobs until nothing is left that this connection can take. The first connection
        (`slot` False: it has the run's own) stays while others run: a piece one of them gives
        back (it failed, or was too slow) must not be left without a connection."""
        refused: set[int] = set()  # sources without a free slot for this connection
        while not self.stop.is_set():
            with self.lock:
                self.changed.clear()
                job = self._next(refused)
                if job is not None:
                    job.source.active += 1
                elif slot or self.alive <= 1 or not self._healthy():
                    return
            if job is None:
                self.changed.wait(1.0)
                refused.clear()
                continue
            try:
                give_back = self._slot(job.source, slot)
                if give_back is None:
                    with self.lock:
                        self._release(job)
                    refused.add(id(job.source))
                    continue
                try:
                    self._run(job)
                finally:
                    give_back()
            finally:
                with self.lock:
                    job.source.active -= 1
                    self._release(job)

    def _slot(self, source: Source, slot: bool) -> Callable[[], None] | None:
        """A slot at the source's origin for this request: none needed where the run's own
        covers it (the first connection, at the run's origin) or nothing limits origins."""
        if (not slot and source.own_slot) or self.spare is None:
            return _nothing
        return self.spare(source.url)

    def _run(self, job: Job) -> None:
        """One range request; a failure counts against its source and leaves the piece to the
        next connection (resumed where it stopped)."""
        source = job.source
        headers = {**source.headers, "Range": f"bytes={job.start}-{job.end - 1}"}
        if source.if_range:
            headers["If-Range"] = source.if_range
        try:
            with redirects.opened(self.session, source.url, headers, self.options.timeout) as r:
                with self.lock:
                    source.requests += 1
                if not self._answered(job, r):
                    return
                self._read(job, r, job.end)
            self._succeeded(job)
        except _DiskError:
            raise
        except DownloadError as exc:
            self._failed(job, str(exc), permanent=isinstance(exc, PermanentError))

    def _answered(self, job: Job, r: requests.Response) -> bool:
        """A 206 with the range asked, of a body of the same size: the job is on (a split is
        committed); else the source is dropped or the split given up."""
        if r.status_code == 200:
            self._drop(job.source, "it answers a range with the whole body", job)
            return False
        responses.raise_for_status(r, job.start)
        found = responses.content_range(r)
        if r.status_code != 206 or found is None or found[2] != self.total:
            self._drop(job.source, "its ranges are not of a body of the same size", job)
            return False
        if found[0] != job.start or found[1] != job.end - 1:
            self._drop(job.source, "it answered a range other than the one asked", job)
            return False
        with self.lock:
            confirmed = self.ranged is None and job.source is self.sources[0]
            if confirmed:
                self.ranged = True
                self.changed.set()
            if job.split:
                victim = job.piece
                if victim.end != job.end or victim.pos + 2 * self.options.chunk_size > job.start:
                    return False  # its writer has come too near meanwhile: pick again
                victim.end = job.start
                job.piece = Piece(job.start, job.end, owner=job)
                self.pieces.append(job.piece)
        if confirmed:
            self._more()
        return True

    def _read(self, job: Job, r: requests.Response, reach: int) -> None:
        """Copy the response's body into the job's piece at its offset, up to the piece's end
        (which may come nearer while reading: another connection took the tail), and on into
        the pieces after it that nobody has taken, as far as the body goes (`reach`)."""
        source = job.source
        pace = self.pacing(source.url) if self.pacing is not None else None
        began, read = time.monotonic(), 0
        last, check_at = began, began + SLOW_AFTER_S
        try:
            while not self.stop.is_set() and not source.slow:
                with self.lock:
                    piece = self._onward(job, reach)
                    left = piece.end - piece.pos
                if left <= 0:
                    if self.ranged is not True and self._next_busy(piece.end, reach):
                        # The range asked there may yet be refused: then this body is the only
                        # one, and it goes on (the probe gives the piece back first).
                        self.changed.wait(0.5)
                        continue
                    break
                chunk = self._chunk(r, min(self.options.chunk_size, left), source.url, read)
                with self.lock:
                    n = min(len(chunk), piece.end - piece.pos)
                    at = piece.pos
                _write_at(self.fd, memoryview(chunk)[:n], at)
                read += n
                now = time.monotonic()
                with self.lock:
                    piece.pos += n
                    source.bytes += n
                    source.busy_s += now - last
                    self.done += n
                last = now
                if pace is not None:
                    pace(n)
                if now >= check_at:
                    check_at = now + 0.5
                    if self._too_slow(source, now - began, read):
                        break
        finally:
            with self.lock:
                source.busy_s += time.monotonic() - last
                self.held_s += pace.held_s if pace is not None else 0.0
            if pace is not None:
                pace.close()

    def _onward(self, job: Job, reach: int) -> Piece:
        """Under the lock: the job's piece; once it is done, the untaken piece right after it
        (within `reach`), which becomes the job's."""
        piece = job.piece
        if piece.pos < piece.end or piece.end >= reach:
            return piece
        for nxt in self.pieces:
            if nxt.pos == piece.end and nxt.pos < nxt.end and nxt.owner is None:
                piece.owner, nxt.owner, job.piece = None, job, nxt
                return nxt
        return piece

    def _next_busy(self, offset: int, reach: int) -> bool:
        with self.lock:
            return offset < reach and any(
                p.pos == offset and p.owner is not None for p in self.pieces
            )

    def _chunk(self, r: requests.Response, size: int, url: str, read: int) -> bytes:
        try:
            chunk: bytes = r.raw.read1(size, decode_content=False)
        except Exception as exc:
            mapped = failures.on_body(exc, url, read, self.options.timeout)
            if mapped is None:
                raise
            raise mapped from None
        if not chunk:
            raise TransientError(f"a range from {where(url)} ended after {read} bytes")
        return chunk

    def _too_slow(self, source: Source, spent: float, read: int) -> bool:
        """Drop a source far slower than the best one (a connection's rate against the best
        source's per connection), if it is not the only one left."""
        with self.lock:
            healthy = self._healthy()
            best = max((s.rate for s in healthy if s is not source), default=0.0)
        if len(healthy) < 2 or read / spent * SLOW_RATIO >= best:
            return False
        source.slow = True
        self._drop(source, f"it ran at {read / spent / 1e6:.2f} MB/s, under 1/{SLOW_RATIO} of "
                           f"the best source's {best / 1e6:.2f} MB/s")  # fmt: skip
        return True

    def _succeeded(self, job: Job) -> None:
        with self.lock:
            if job.piece.pos >= job.piece.end:
                job.source.fails = 0

    def _failed(self, job: Job, why: str, permanent: bool) -> None:
        """A permanent failure drops the source; a transient one does after MAX_FAILS in a row,
        or, for the last source left, after LAST_FAILS in the attempt (the retry resumes)."""
        source = job.source
        with self.lock:
            self._release(job)
            source.fails += 1
            source.failed += 1
            last = len(self._healthy()) == 1
            spent = permanent or source.fails >= (LAST_FAILS if last else MAX_FAILS)
            spent = spent or (last and source.failed >= LAST_FAILS)
            pause = min(0.5, 0.1 * source.fails)
        log.info("range from %s failed: %s", redact_url(source.url), why)
        if spent:
            self._drop(source, why)
        else:
            self.stop.wait(pause)  # a moment before asking it again

    def _drop(self, source: Source, why: str, job: Job | None = None) -> None:
        """No more requests to `source` (the job it refused gives its piece back first, so a
        reader waiting for the answer finds it free)."""
        with self.lock:
            if job is not None:
                self._release(job)
            if source.dropped is not None:
                return
            source.dropped = why
            if source is self.sources[0] and self.ranged is None:
                self.ranged = False
            self.changed.set()
        log.info("source %s dropped: %s", redact_url(source.url), why)

    def close(self) -> None:
        """Stop every connection and wait for them (each ends within its read timeout)."""
        self.stop.set()
        self.changed.set()
        for thread in self.threads:
            thread.join()


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    """All of `data` at `offset` (pwrite may write less, as on a disk nearly full)."""
    try:
        while data:
            n = os.pwrite(fd, data, offset)
            data, offset = data[n:], offset + n
    except OSError as exc:
        raise _DiskError(str(disk_error(exc, "writing the body"))) from exc


def _nothing() -> None:
    return None


class _DiskError(PermanentError):
    """Writing the file failed: the download fails, whichever connection saw it."""


class PrefixHash:
    """The sha256 of the file's contiguous prefix, fed as the prefix grows, on a thread of its
    own: the bytes are read back with pread from the page cache they were just written to."""

    def __init__(self, fd: int, hasher: Any = None, hashed: int = 0) -> None:
        self.fd, self.hasher, self.hashed = fd, hasher or hashlib.sha256(), hashed
        self.target = hashed
        self.cond = threading.Condition()
        self.failed: BaseException | None = None
        self.ended = self.abandoned = False
        self.thread = threading.Thread(target=self._run, name="sha256-prefix", daemon=True)
        self.thread.start()

    def advance(self, upto: int) -> None:
        with self.cond:
            if upto > self.target:
                self.target = upto
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                while self.hashed >= self.target and not self.ended:
                    self.cond.wait()
                if self.hashed >= self.target:
                    return
                upto = self.target
            try:
                while self.hashed < upto and not self.abandoned:
                    block = os.pread(self.fd, min(HASH_BLOCK, upto - self.hashed), self.hashed)
                    if not block:
                        raise OSError(f"the file ended at {self.hashed} bytes")
                    self.hasher.update(block)
                    self.hashed += len(block)
            except BaseException as exc:  # finish() raises it
                self.failed = exc
                return

    def finish(self, upto: int) -> str:
        """The digest of the first `upto` bytes, once all are hashed."""
        self.advance(upto)
        with self.cond:
            self.ended = True
            self.cond.notify()
        self.thread.join()
        if isinstance(self.failed, OSError):
            raise disk_error(self.failed, "hashing the body")
        if self.failed is not None:
            raise self.failed
        if self.hashed != upto:
            raise PermanentError(f"hashing stopped at {self.hashed} of {upto} bytes")
        return str(self.hasher.hexdigest())

    def abandon(self) -> None:
        with self.cond:
            self.ended = self.abandoned = True
            self.cond.notify()
        self.thread.join()


def run(
    fetch: Fetch,
    first: tuple[requests.Response, Source] | None,
    hasher: PrefixHash,
    save: Callable[[list[tuple[int, int]]], None],
    on_progress: Progress,
) -> None:
    """Fetch every missing range: report progress, feed the hash and save what is missing as it
    goes; raise what failed the download, or TransientError when ranges are left that no source
    could serve (the next attempt resumes them)."""
    saved_at = time.monotonic()
    try:
        fetch.start(first)
        while not fetch.finished.wait(TICK_S):
            on_progress(fetch.base + fetch.done, fetch.total, fetch.held_s)
            hasher.advance(fetch.contiguous())
            if time.monotonic() - saved_at >= SAVE_EVERY_S:
                save(fetch.missing())
                saved_at = time.monotonic()
    finally:
        fetch.close()  # every connection stopped: what is missing now is exact
        left = fetch.missing()
        if left:
            save(left)
    if fetch.error is not None:
        raise fetch.error
    if left:
        why = "; ".join(f"{redact_url(s.url)}: {s.dropped}" for s in fetch.sources if s.dropped)
        raise TransientError(f"{sum(b - a for a, b in left)} bytes in {len(left)} ranges had no "
                             f"source left ({why or 'none answered'})")  # fmt: skip
    on_progress(fetch.total, fetch.total, fetch.held_s)


def served(fetch: Fetch) -> tuple[tuple[str, int, int], ...]:
    """(url, bytes, requests) of each source that was asked."""
    return tuple((s.url, s.bytes, s.requests) for s in fetch.sources if s.requests or s.bytes)
