"""The plain download code against the loopback origin, without Celery."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import threading
import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from download_client.arguments import PARTIAL_DIR, DownloadRequest
from download_client.errors import DestinationBusyError, PermanentError, TransientError
from download_client.settings import Settings
from tasks.core.http import new_session
from tasks.core.records import RECORD_XATTR, Record
from tasks.core.storage import LOCKS, Target
from tasks.core.transfer import Limits, download, drop_mismatch
from tasks.runtime import Runtime
from tests.harness import ROOT
from tests.server import OriginServer, body, body_sha256

LIMITS = Limits(connect_timeout=2, read_timeout=2, max_bytes=10 * 1024 * 1024, chunk_size=65536)


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = new_session(allow_private=True)
    yield s
    s.close()


def fetch(session: requests.Session, root: Path, url: str, dest: str = "f.bin", **kw: object):
    return download(session, DownloadRequest(url=url, dest=dest, **kw), root, LIMITS)  # type: ignore[arg-type]


def partials(root: Path) -> list[Path]:
    return sorted((root / ".partial").glob("*.part"))


def in_progress_area(root: Path) -> list[str]:
    """Every file in .partial/ but `locks` (it stays): once nothing runs, there should be none."""
    return sorted(p.name for p in (root / ".partial").iterdir() if p.name != LOCKS)


def test_streams_the_body_to_its_destination(session, tmp_path, origin: OriginServer):
    out = fetch(session, tmp_path, f"{origin.url}/bytes/300000?seed=a", "x/y/f.bin")
    assert (tmp_path / "x/y/f.bin").read_bytes() == body(300000, "a")
    assert (out.size, out.sha256, out.http_status) == (300000, body_sha256(300000, "a"), 200)
    assert out.resumed_from == 0 and not out.skipped
    assert out.content_type == "application/octet-stream"
    assert partials(tmp_path) == []


def test_reports_progress_with_the_total(session, tmp_path, origin):
    seen: list[tuple[int, int | None]] = []
    request = DownloadRequest(url=f"{origin.url}/bytes/200000", dest="p.bin")
    progress = lambda done, total, held: seen.append((done, total))  # noqa: E731
    download(session, request, tmp_path, LIMITS, progress)
    assert seen[-1] == (200000, 200000)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_cut_connection_keeps_the_partial_and_the_next_try_resumes(session, tmp_path, origin):
    url = f"{origin.url}/bytes/500000?seed=r&cut=200000&cut_times=1&key=resume-unit"
    with pytest.raises(TransientError, match="connection"):
        fetch(session, tmp_path, url)
    assert not (tmp_path / "f.bin").exists()
    [part] = partials(tmp_path)
    assert part.stat().st_size == 200000
    out = fetch(session, tmp_path, url)
    assert out.resumed_from == 200000 and out.http_status == 206
    assert out.sha256 == body_sha256(500000, "r")
    last = origin.stats.requests[-1]
    assert last.headers["Range"] == "bytes=200000-" and last.headers["If-Range"] == '"r-500000"'
    assert partials(tmp_path) == []


def test_a_server_that_ignores_range_starts_over(session, tmp_path, origin):
    url = f"{origin.url}/bytes/300000?seed=n&cut=100000&cut_times=1&norange=1&key=norange-unit"
    with pytest.raises(TransientError):
        fetch(session, tmp_path, url)
    out = fetch(session, tmp_path, url)
    assert out.resumed_from == 0 and out.http_status == 200
    assert (tmp_path / "f.bin").read_bytes() == body(300000, "n")


def test_without_validators_a_partial_is_not_kept(session, tmp_path, origin):
    url = f"{origin.url}/bytes/300000?noetag=1&nolm=1&cut=100000&cut_times=1&key=noval-unit"
    with pytest.raises(TransientError):
        fetch(session, tmp_path, url)
    assert partials(tmp_path) == []


def test_a_body_shorter_than_its_length_is_never_published(session, tmp_path, origin):
    with pytest.raises(TransientError):
        fetch(session, tmp_path, f"{origin.url}/bytes/300000?short=1000&noetag=1&nolm=1")
    assert not (tmp_path / "f.bin").exists() and partials(tmp_path) == []


def test_checksum_mismatch_fails_and_leaves_nothing(session, tmp_path, origin):
    with pytest.raises(PermanentError, match="sha256 mismatch"):
        fetch(session, tmp_path, f"{origin.url}/bytes/1000", sha256="0" * 64)
    assert not (tmp_path / "f.bin").exists() and partials(tmp_path) == []


def test_a_mismatch_is_kept_for_its_download_until_its_failure_is_stored(session, tmp_path, origin):
    """A run killed before its FAILURE is stored is run again: it reads the verdict off the kept
    body instead of fetching it again; another download of the same URL fetches to see."""
    url = f"{origin.url}/bytes/3000?seed=m&key=kept-mismatch"
    said = f"sha256 mismatch: expected {'0' * 64}, got {body_sha256(3000, 'm')}"
    request = DownloadRequest(url=url, dest="m.bin", sha256="0" * 64)
    for run in ("first", "again"):
        with pytest.raises(PermanentError, match=f"^{said}$"):
            download(session, request, tmp_path, LIMITS, download_id="d1")
        assert len(origin.stats.for_key("kept-mismatch")) == 1, run
        assert len(partials(tmp_path)) == 1 and not (tmp_path / "m.bin").exists()
    with pytest.raises(PermanentError, match=f"^{said}$"):
        download(session, request, tmp_path, LIMITS, download_id="d2")
    assert len(origin.stats.for_key("kept-mismatch")) == 2
    drop_mismatch(tmp_path, request)
    assert in_progress_area(tmp_path) == []


def test_a_mismatch_read_again_from_disk_is_still_its_and_goes_once_its_failure_is_stored(
    session, tmp_path, origin
):
    """Reading the kept body again marks it in use (its mtime): its record follows, so a third
    run still reads the verdict and, once the FAILURE is stored, the body goes."""
    url = f"{origin.url}/bytes/3000?seed=r&key=mismatch-again"
    request = DownloadRequest(url=url, dest="r.bin", sha256="0" * 64)
    for _ in range(3):
        with pytest.raises(PermanentError, match="sha256 mismatch"):
            download(session, request, tmp_path, LIMITS, download_id="d1")
    assert len(origin.stats.for_key("mismatch-again")) == 1
    drop_mismatch(tmp_path, request)
    assert in_progress_area(tmp_path) == []


def test_matching_checksum_on_disk_skips_without_a_request(session, tmp_path, origin):
    url = f"{origin.url}/bytes/4000?seed=s"
    fetch(session, tmp_path, url)
    before = origin.stats.count()
    out = fetch(session, tmp_path, url, sha256=body_sha256(4000, "s"))
    assert out.skipped and out.sha256 == body_sha256(4000, "s") and out.http_status is None
    assert origin.stats.count() == before


def test_an_unchanged_file_is_not_downloaded_again(session, tmp_path, origin):
    url = f"{origin.url}/bytes/4000?seed=c"
    fetch(session, tmp_path, url)
    out = fetch(session, tmp_path, url)
    assert out.skipped and out.http_status == 304 and out.size == 4000
    assert origin.stats.requests[-1].headers["If-None-Match"] == '"c-4000"'


def test_a_file_on_disk_never_stands_for_a_request_it_fails(session, tmp_path, origin):
    """An unchanged file (a 304) that this request's sha256 or size cap would refuse is no
    success: the body is fetched again and checked, and the file there is left as it was."""
    url = f"{origin.url}/bytes/4000?seed=w"
    fetch(session, tmp_path, url)
    with pytest.raises(PermanentError, match="sha256 mismatch"):
        fetch(session, tmp_path, url, sha256="0" * 64)
    with pytest.raises(PermanentError, match=r"4000|limit|larger"):
        fetch(session, tmp_path, url, max_bytes=1000)
    assert "If-None-Match" not in origin.stats.requests[-1].headers
    assert (tmp_path / "f.bin").read_bytes() == body(4000, "w")


def test_a_changed_file_on_disk_is_downloaded_again(session, tmp_path, origin):
    url = f"{origin.url}/bytes/4000?seed=d"
    fetch(session, tmp_path, url)
    (tmp_path / "f.bin").write_bytes(b"changed by someone")
    out = fetch(session, tmp_path, url)
    assert not out.skipped and (tmp_path / "f.bin").read_bytes() == body(4000, "d")


def test_size_cap_from_content_length_fails_before_the_body(session, tmp_path, origin):
    with pytest.raises(PermanentError, match="over the 1000-byte limit"):
        fetch(session, tmp_path, f"{origin.url}/bytes/5000", max_bytes=1000)
    assert partials(tmp_path) == []


def test_size_cap_on_an_endless_body(session, tmp_path, origin):
    with pytest.raises(PermanentError, match="passed the 100000-byte limit"):
        fetch(session, tmp_path, f"{origin.url}/bytes/1?endless=1", max_bytes=100000)
    assert not (tmp_path / "f.bin").exists() and partials(tmp_path) == []


def test_an_unasked_gzip_body_is_stored_as_sent(session, tmp_path, origin):
    out = fetch(session, tmp_path, f"{origin.url}/bytes/5000000?gzip=1", max_bytes=100000)
    raw = (tmp_path / "f.bin").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and out.size == len(raw) < 100000
    assert origin.stats.requests[-1].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    ("query", "error", "match"),
    [
        ("status=404", PermanentError, "HTTP 404"),
        ("status=403", PermanentError, "HTTP 403"),
        ("status=500", TransientError, "HTTP 500"),
        ("status=503", TransientError, "HTTP 503"),
        ("status=429", TransientError, "HTTP 429"),
        ("status=408", TransientError, "HTTP 408"),
    ],
)
def test_statuses_are_transient_or_permanent(session, tmp_path, origin, query, error, match):
    with pytest.raises(error, match=match):
        fetch(session, tmp_path, f"{origin.url}/bytes/10?{query}")


def test_retry_after_in_seconds_and_as_a_date(session, tmp_path, origin):
    with pytest.raises(TransientError) as seconds:
        fetch(session, tmp_path, f"{origin.url}/bytes/10?status=429&retry_after=7")
    assert seconds.value.retry_after == 7
    date = "Wed, 21 Oct 2015 07:28:00 GMT"
    with pytest.raises(TransientError) as past:
        fetch(session, tmp_path, f"{origin.url}/bytes/10?status=503&retry_after={date}")
    assert past.value.retry_after == 0


def test_redirects_are_followed_and_reported(session, tmp_path, origin):
    out = fetch(session, tmp_path, f"{origin.url}/bytes/3000?redirect=3&seed=z")
    assert out.sha256 == body_sha256(3000, "z") and "redirect=0" in out.final_url


def test_more_than_ten_redirects_fail(session, tmp_path, origin):
    with pytest.raises(PermanentError, match="more than 10 redirects"):
        fetch(session, tmp_path, f"{origin.url}/bytes/3000?redirect=11")


def test_a_connection_refused_is_transient(session, tmp_path):
    from tests.harness import free_port

    port = free_port()
    with pytest.raises(TransientError, match=rf"^connection refused by 127\.0\.0\.1:{port}$"):
        fetch(session, tmp_path, f"http://127.0.0.1:{port}/x?token=secret")


def test_a_stall_after_the_headers_times_out(session, tmp_path, origin):
    limits = Limits(connect_timeout=1, read_timeout=0.3, max_bytes=10**6, chunk_size=65536)
    request = DownloadRequest(url=f"{origin.url}/bytes/1000?stall=3&noetag=1&nolm=1", dest="s")
    said = rf"^timed out after 0\.3 s waiting for 127\.0\.0\.1:{origin.server_address[1]}$"
    with pytest.raises(TransientError, match=said):
        download(session, request, tmp_path, limits)
    assert partials(tmp_path) == []


def test_a_download_interns_none_of_its_names(session, tmp_path, origin, monkeypatch):
    """pathlib interns every component it parses (sys.intern), and each download brings new
    names (its destination, its partial's hash): in a worker child the table of interned strings
    then grows until it is rebuilt, in pages of the child's own. A download parses none."""
    import pathlib

    interned: list[str] = []

    class Sys(types.ModuleType):
        def __getattr__(self, name: str) -> Any:
            return getattr(sys, name)

        @staticmethod
        def intern(text: str) -> str:
            interned.append(text)
            return text

    monkeypatch.setattr(pathlib, "sys", Sys("sys"))
    fetch(session, tmp_path, f"{origin.url}/bytes/1000", dest="a/first.bin")
    interned.clear()
    for i in range(3):  # cut once, then resumed: the partial, its validators, the publish
        url = f"{origin.url}/bytes/300000?cut=100000&cut_times=1&seed=i{i}&key={uuid.uuid4()}"
        with pytest.raises(TransientError):
            fetch(session, tmp_path, url, dest=f"a/{i}.bin")
        assert fetch(session, tmp_path, url, dest=f"a/{i}.bin").resumed_from == 100000
    assert [name for name in interned if name not in ("a", PARTIAL_DIR, LOCKS)] == []


def test_a_destination_busy_in_another_task_is_transient(session, tmp_path, origin):
    url = f"{origin.url}/bytes/10"
    with (
        Target(tmp_path, "f.bin", "other").locked(),
        pytest.raises(TransientError, match="another task"),
    ):
        fetch(session, tmp_path, url)


def test_one_session_reuses_one_connection(tmp_path):
    server = OriginServer().start()
    try:
        s = new_session(allow_private=True)
        for i in range(20):
            fetch(s, tmp_path, f"{server.url}/bytes/1000?seed={i}", f"{i}.bin")
        assert server.stats.connections == 1
    finally:
        server.stop()


def test_hash_covers_the_resumed_prefix(session, tmp_path, origin):
    url = f"{origin.url}/bytes/400000?seed=h&cut=150000&cut_times=1&key=hash-unit"
    with pytest.raises(TransientError):
        fetch(session, tmp_path, url)
    out = fetch(session, tmp_path, url)
    assert out.sha256 == hashlib.sha256((tmp_path / "f.bin").read_bytes()).hexdigest()


def test_a_downloaded_file_has_the_usual_mode_for_other_readers(session, tmp_path, origin):
    umask = os.umask(0o022)
    try:
        fetch(session, tmp_path, f"{origin.url}/bytes/100")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "f.bin").stat().st_mode) == 0o644


def test_the_record_travels_with_the_file_and_nothing_stays_in_progress(session, tmp_path, origin):
    url = f"{origin.url}/bytes/300000?seed=x"
    fetch(session, tmp_path, url, headers={"Authorization": "Bearer planted-secret"})
    assert in_progress_area(tmp_path) == []
    raw = os.getxattr(tmp_path / "f.bin", RECORD_XATTR)
    record = json.loads(raw)
    assert record["url"] == url and record["etag"] == '"x-300000"'
    assert record["sha256"] == body_sha256(300000, "x") and record["size"] == 300000
    assert record["mtime_ns"] == (tmp_path / "f.bin").stat().st_mtime_ns
    assert b"planted-secret" not in raw and b"Authorization" not in raw
    out = fetch(session, tmp_path, url)
    assert out.skipped and out.http_status == 304 and in_progress_area(tmp_path) == []


def test_without_user_xattrs_it_still_downloads_and_fetches_whole_again(
    session, tmp_path, origin, monkeypatch
):
    def unsupported(*args: object, **kw: object) -> bytes:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    monkeypatch.setattr(os, "setxattr", unsupported)
    monkeypatch.setattr(os, "getxattr", unsupported)
    url = f"{origin.url}/bytes/4000?seed=nx"
    first = fetch(session, tmp_path, url)
    again = fetch(session, tmp_path, url)
    assert (first.http_status, again.http_status) == (200, 200) and not again.skipped
    assert "If-None-Match" not in origin.stats.requests[-1].headers
    assert (tmp_path / "f.bin").read_bytes() == body(4000, "nx")
    assert in_progress_area(tmp_path) == []


def test_a_record_of_another_url_at_the_same_destination_is_not_used(session, tmp_path, origin):
    a, b = f"{origin.url}/bytes/4000?seed=ua", f"{origin.url}/bytes/4000?seed=ub"
    fetch(session, tmp_path, a)
    fetch(session, tmp_path, b)
    assert "If-None-Match" not in origin.stats.requests[-1].headers
    out = fetch(session, tmp_path, a)
    assert not out.skipped and "If-None-Match" not in origin.stats.requests[-1].headers
    assert (tmp_path / "f.bin").read_bytes() == body(4000, "ua")


def test_a_record_that_is_not_one_is_ignored(session, tmp_path, origin):
    url = f"{origin.url}/bytes/4000?seed=bad"
    fetch(session, tmp_path, url)
    for planted in (b"[]", b"{not json", json.dumps({"url": url, "sha256": 5}).encode()):
        os.setxattr(tmp_path / "f.bin", RECORD_XATTR, planted)
        out = fetch(session, tmp_path, url)
        assert not out.skipped and out.http_status == 200


def test_a_permanent_failure_removes_the_partial_it_would_have_resumed(session, tmp_path, origin):
    url = f"{origin.url}/bytes/400000?clen=-5"
    target = Target(tmp_path, "f.bin", url)
    with target.locked():
        target.save_sidecar(Record(etag='"0-400000"'))
        f, _ = target.open_partial(0)
        f.write(b"x" * 300000)
        f.close()
    with pytest.raises(PermanentError, match="invalid Content-Length '-5'"):
        fetch(session, tmp_path, url)
    assert origin.stats.requests[-1].headers["Range"] == "bytes=300000-"
    assert in_progress_area(tmp_path) == []


@pytest.mark.parametrize("query", ["status=404", "status=500", "sha256", "cut=1000"])
def test_a_failed_download_leaves_no_lock(session, tmp_path, origin, query):
    kw = {"sha256": "0" * 64} if query == "sha256" else {}
    with pytest.raises((PermanentError, TransientError)):
        fetch(session, tmp_path, f"{origin.url}/bytes/4000?{query}&noetag=1", **kw)
    assert in_progress_area(tmp_path) == []


def test_a_destination_lock_excludes_threads_and_processes_and_dies_with_its_holder(tmp_path):
    """One destination, one writer: another thread of this process and another process are
    refused while it is held, another destination is not, a waiter gets it once it is released,
    and a holder killed with SIGKILL leaves it free. No file is made or removed per lock."""
    target = Target(tmp_path, "f.bin", "u")
    got, release = threading.Event(), threading.Event()

    def holder() -> None:
        with target.locked():
            got.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    got.wait(10)
    try:
        with pytest.raises(DestinationBusyError), Target(tmp_path, "f.bin", "other").locked():
            pass
        assert _lock_in_child(tmp_path, "f.bin", hold=False) == "busy"
        with Target(tmp_path, "g.bin", "u").locked():  # another destination
            pass
    finally:
        release.set()
    with target.locked(wait=10):  # the waiter gets it once the holder lets go
        thread.join(10)
    killed = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(tmp_path), "f.bin", "hold"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "locked"
        with pytest.raises(DestinationBusyError), target.locked():
            pass
    finally:
        killed.kill()
        killed.communicate(timeout=10)
    with target.locked(wait=10):
        pass
    assert in_progress_area(tmp_path) == [] and os.listdir(tmp_path / ".partial") == ["locks"]


def test_a_symlink_planted_as_the_lock_file_is_refused(session, tmp_path, origin):
    """`.partial/locks` is opened without following a link: a link planted there fails the
    download at once, with the reason, and nothing is written through it."""
    (tmp_path / ".partial").mkdir(mode=0o700)
    victim = tmp_path / "elsewhere"
    victim.write_bytes(b"")
    os.symlink(victim, tmp_path / ".partial" / LOCKS)
    with pytest.raises(PermanentError, match=r"^cannot write the download \(locking the dest"):
        fetch(session, tmp_path, f"{origin.url}/bytes/10?key=planted-lock")
    assert victim.read_bytes() == b"" and not (tmp_path / "f.bin").exists()
    assert origin.stats.for_key("planted-lock") == []  # refused before any request


def test_a_fork_while_a_destination_is_held_leaves_no_copy_holding_it(tmp_path):
    """The worker's main process may hold a destination (removing a revoked download's partial)
    while it forks a child: once the holder lets go, the destination is free, child or not."""
    from tasks.core import locks

    target = Target(tmp_path, "f.bin", "u")
    read, write = os.pipe()
    said, told = os.pipe()
    with target.locked():
        [held] = locks._held
        pid = os.fork()
        if pid == 0:  # the child lives on, as a pool child would, until told to go
            os.close(write)
            os.close(said)
            try:
                os.fstat(held)
                os.write(told, b"kept")
            except OSError:
                os.write(told, b"none")
            os.read(read, 1)
            os._exit(0)
    os.close(read)
    os.close(told)
    try:
        assert os.read(said, 4) == b"none"  # the child holds no copy of the lock's file
        assert _lock_in_child(tmp_path, "f.bin", hold=False) == "locked"
    finally:
        os.write(write, b"x")
        os.close(write)
        os.close(said)
        os.waitpid(pid, 0)


_LOCKER = """
import sys, time
from pathlib import Path
from download_client.errors import DestinationBusyError
from tasks.core.storage import LOCKS, Target
try:
    with Target(Path(sys.argv[1]), sys.argv[2], "u").locked():
        print("locked", flush=True)
        if sys.argv[3] == "hold":
            time.sleep(60)
except DestinationBusyError:
    print("busy", flush=True)
"""


def _lock_in_child(root: Path, dest: str, hold: bool) -> str:
    done = subprocess.run(
        [sys.executable, "-c", _LOCKER, str(root), dest, "hold" if hold else "try"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    return done.stdout.strip()


class Killed(BaseException):
    """A SIGKILL as the download code meets it: nothing below it runs, nothing catches it."""


def killed_run(session, tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run of `url` killed after the body is whole, checked, recorded and fsynced: at the
    rename into the destination's directory (a resume record's own rename goes on)."""
    replace = os.replace

    def killed(*args: Any, **kwargs: Any) -> None:
        if "dst_dir_fd" in kwargs:
            raise Killed
        replace(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(os, "replace", killed)
        with pytest.raises(Killed):
            fetch(session, tmp_path, url)


@pytest.mark.parametrize("size", [100_000, 600_000])  # without and with a resume record
def test_a_body_a_killed_run_had_whole_is_published_without_a_request(
    session, tmp_path, origin, monkeypatch, size
):
    url = f"{origin.url}/bytes/{size}?seed=k{size}&key=arrived-{size}"
    killed_run(session, tmp_path, url, monkeypatch)
    assert not (tmp_path / "f.bin").exists() and len(partials(tmp_path)) == 1
    out = fetch(session, tmp_path, url)
    assert len(origin.stats.for_key(f"arrived-{size}")) == 1  # the killed run's request alone
    assert (tmp_path / "f.bin").read_bytes() == body(size, f"k{size}")
    assert (out.sha256, out.size, out.resumed_from) == (body_sha256(size, f"k{size}"), size, size)
    assert (out.http_status, out.final_url, out.skipped) == (200, url, False)
    assert in_progress_area(tmp_path) == []
    assert fetch(session, tmp_path, url).skipped  # and the record now stands for the file


def test_an_arrived_body_whose_bytes_changed_since_is_fetched_again(
    session, tmp_path, origin, monkeypatch
):
    url = f"{origin.url}/bytes/100000?seed=t&key=arrived-tampered"
    killed_run(session, tmp_path, url, monkeypatch)
    [part] = partials(tmp_path)
    st = part.stat()
    with part.open("r+b") as f:  # one byte changed; size and mtime as the record has them
        f.write(b"\xff" if body(100000, "t")[:1] != b"\xff" else b"\x00")
    os.utime(part, ns=(st.st_atime_ns, st.st_mtime_ns))
    out = fetch(session, tmp_path, url)
    assert len(origin.stats.for_key("arrived-tampered")) == 2
    assert out.sha256 == body_sha256(100000, "t") and out.resumed_from == 0
    assert in_progress_area(tmp_path) == []


def test_an_arrived_body_is_not_published_for_a_request_it_fails(
    session, tmp_path, origin, monkeypatch
):
    url = f"{origin.url}/bytes/100000?seed=c&key=arrived-capped"
    killed_run(session, tmp_path, url, monkeypatch)
    with pytest.raises(PermanentError, match="limit"):
        fetch(session, tmp_path, url, max_bytes=50000)
    assert not (tmp_path / "f.bin").exists() and in_progress_area(tmp_path) == []


def test_a_file_its_own_earlier_run_published_is_its_outcome_without_a_request(
    session, tmp_path, origin
):
    """A run killed after its rename, before its SUCCESS was stored: the message comes back, and
    the next run reports the file, even from an origin with no validators to ask about it."""
    url = f"{origin.url}/bytes/100000?seed=p&noetag=1&nolm=1&key=published"
    request = DownloadRequest(url=url, dest="f.bin")
    first = download(session, request, tmp_path, LIMITS, download_id="d-1")
    again = download(session, request, tmp_path, LIMITS, download_id="d-1")
    assert len(origin.stats.for_key("published")) == 1
    assert (again.sha256, again.size, again.http_status) == (first.sha256, 100000, 200)
    assert (again.final_url, again.path, again.skipped) == (url, "f.bin", False)
    assert (tmp_path / "f.bin").read_bytes() == body(100000, "p")


def test_a_published_file_is_fetched_again_for_another_download_or_once_changed_or_old(
    session, tmp_path, origin
):
    url = f"{origin.url}/bytes/100000?seed=q&noetag=1&nolm=1&key=published-not"
    request = DownloadRequest(url=url, dest="f.bin")
    download(session, request, tmp_path, LIMITS, download_id="d-1")
    download(session, request, tmp_path, LIMITS, download_id="d-2")  # another download
    assert len(origin.stats.for_key("published-not")) == 2
    dest = tmp_path / "f.bin"
    os.utime(dest, ns=(dest.stat().st_atime_ns, dest.stat().st_mtime_ns + 1))  # changed since
    download(session, request, tmp_path, LIMITS, download_id="d-2")
    assert len(origin.stats.for_key("published-not")) == 3
    short_lived = Limits(2, 2, 10 * 1024 * 1024, 65536, id_lifetime=60)
    old = dest.stat().st_mtime_ns - 61 * 10**9  # published longer ago than the id's life
    with dest.open("r+b") as f:
        attached = Record.from_json(os.getxattr(f.fileno(), RECORD_XATTR))
        os.utime(f.fileno(), ns=(old, old))
        attached.mtime_ns = old
        os.setxattr(f.fileno(), RECORD_XATTR, attached.to_json())
    assert attached.published_for == "d-2"
    download(session, request, tmp_path, short_lived, download_id="d-2")
    assert len(origin.stats.for_key("published-not")) == 4


def test_a_workers_downloads_trust_their_own_published_files_for_the_results_life(tmp_path):
    env = {"DOWNLOAD_RESULT_EXPIRES": "3600", "DOWNLOAD_DIR": str(tmp_path)}
    rt = Runtime.open(Settings.from_env(env))
    try:
        assert rt.limits.id_lifetime == 3600
    finally:
        rt.close()
