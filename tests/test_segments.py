"""Segmented downloads and mirrors, in process: the download code against loopback origins, with
the requests each origin saw counted there."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from download_client.arguments import DownloadRequest, parse
from download_client.errors import PermanentError, TransientError
from download_client.settings import Settings, SettingsError
from tasks.core import segments
from tasks.core.http import new_session
from tasks.core.storage import Ranges, Target
from tasks.core.sweep import sweep_partials
from tasks.core.transfer import Limits, download
from tests.server import OriginServer, body, body_sha256

MIB = 1024 * 1024
SIZE = 24 * MIB
LIMITS = Limits(connect_timeout=2, read_timeout=5, max_bytes=1 << 30, chunk_size=65536,
                segments=4, segment_min=8 * MIB)  # fmt: skip


@pytest.fixture
def session() -> Iterator[requests.Session]:
    s = new_session(allow_private=True, pool_maxsize=8)
    yield s
    s.close()


@pytest.fixture
def mirror() -> Iterator[OriginServer]:
    server = OriginServer().start()
    yield server
    server.stop()


def ranges_asked(origin: OriginServer, key: str) -> list[tuple[int, int] | None]:
    return origin.stats.ranges(key, SIZE)


def fetch(session, root: Path, url: str, limits: Limits = LIMITS, **kw):
    request = DownloadRequest(url=url, dest="big.bin", **kw)
    return download(session, request, root, limits)


def test_a_large_body_comes_over_several_connections_into_one_file(session, tmp_path, origin):
    url = f"{origin.url}/bytes/{SIZE}?seed=s&rate=8000000&key=seg"
    out = fetch(session, tmp_path, url)
    assert (tmp_path / "big.bin").read_bytes() == body(SIZE, "s")
    assert out.sha256 == body_sha256(SIZE, "s") and out.size == SIZE
    asked = ranges_asked(origin, "seg")
    assert asked[0] is None and len(asked) >= 4  # the first request as always, then ranges
    assert origin.stats.most_at_once("seg") >= 3
    assert [u for u, _, _ in out.sources] == [url] and out.sources[0][1] == SIZE
    assert sorted((tmp_path / ".partial").iterdir()) == [tmp_path / ".partial" / "locks"]


def test_a_small_body_comes_over_one_connection(session, tmp_path, origin):
    out = fetch(session, tmp_path, f"{origin.url}/bytes/{4 * MIB}?key=small")
    assert ranges_asked(origin, "small") == [None] and out.sources[0][2] == 1


def test_an_origin_that_ignores_range_gets_the_body_written_once(session, tmp_path, origin):
    url = f"{origin.url}/bytes/{SIZE}?seed=n&norange=1&rate=20000000&key=norange"
    written: list[int] = []
    real = os.pwrite

    def counting(fd: int, data: bytes, offset: int) -> int:
        written.append(len(data))
        return real(fd, data, offset)

    segments.os.pwrite = counting  # type: ignore[attr-defined]
    try:
        out = fetch(session, tmp_path, url)
    finally:
        segments.os.pwrite = real  # type: ignore[attr-defined]
    assert out.sha256 == body_sha256(SIZE, "n")
    assert sum(written) == SIZE  # not a byte written twice
    asked = ranges_asked(origin, "norange")
    assert asked[0] is None and len(asked) == 2  # one range asked, answered whole, never again


def test_a_killed_run_leaves_ranges_and_the_next_asks_only_for_them(session, tmp_path, origin):
    url = f"{origin.url}/bytes/{SIZE}?seed=k&rate=4000000&key=kill"
    original = segments.Fetch._chunk

    def dying(self, r, size, url, read):  # the run ends once 1/3 of the body is in the file
        if self.base + self.done > SIZE // 3:
            raise SystemExit("killed")
        return original(self, r, size, url, read)

    segments.Fetch._chunk = dying  # type: ignore[method-assign]
    try:
        with pytest.raises(SystemExit):
            fetch(session, tmp_path, url)
    finally:
        segments.Fetch._chunk = original  # type: ignore[method-assign]
    target = Target(tmp_path, "big.bin", url)
    saved = target.load_ranges()
    assert saved is not None and saved.total == SIZE
    missing = sum(b - a for a, b in saved.missing)
    before = len(origin.stats.for_key("kill"))
    out = fetch(session, tmp_path, url)
    assert out.sha256 == body_sha256(SIZE, "k")
    assert out.resumed_from == SIZE - missing > 0
    again = [r for r in ranges_asked(origin, "kill")[before:]]
    assert all(r is not None for r in again)  # no request for the whole body
    for a, b in again:  # type: ignore[misc]
        assert any(x <= a and b <= y for x, y in saved.missing), (a, b, saved.missing)
    assert sum(b - a for a, b in again) <= missing  # type: ignore[misc]


def test_a_changed_body_drops_the_ranges_and_starts_over(session, tmp_path, origin):
    url = f"{origin.url}/bytes/{SIZE}?seed=c"
    target = Target(tmp_path, "big.bin", url)
    (tmp_path / ".partial").mkdir()
    target.part_path.write_bytes(b"x" * MIB)
    target.save_ranges(Ranges(SIZE, '"an-older-etag"', url, [(MIB, SIZE)]))
    out = fetch(session, tmp_path, url)
    assert out.sha256 == body_sha256(SIZE, "c") and out.resumed_from == 0


def test_a_resetting_mirror_is_dropped_and_the_healthy_one_serves(session, tmp_path, origin,
                                                                   mirror):  # fmt: skip
    good = f"{origin.url}/bytes/{SIZE}?seed=m&rate=8000000&key=good"
    bad = f"{mirror.url}/bytes/{SIZE}?seed=m&drop_after={MIB}&key=bad"
    out = fetch(session, tmp_path, good, sha256=body_sha256(SIZE, "m"), mirrors=(bad,))
    assert out.sha256 == body_sha256(SIZE, "m")
    served = {u: n for u, n, _ in out.sources}
    # Dropped after MAX_FAILS failures (connections asking it at that moment end as theirs).
    most = segments.MAX_FAILS + LIMITS.segments - 1
    assert served[good] > SIZE * 3 // 4 and served.get(bad, 0) <= most * MIB
    assert len(mirror.stats.for_key("bad")) <= most
    assert sum(served.values()) == SIZE


def test_mirrors_share_the_ranges(session, tmp_path, origin, mirror):
    first = f"{origin.url}/bytes/{SIZE}?seed=w&rate=4000000&key=w1"
    second = f"{mirror.url}/bytes/{SIZE}?seed=w&rate=4000000&key=w2"
    out = fetch(session, tmp_path, first, sha256=body_sha256(SIZE, "w"), mirrors=(second,))
    served = {u: n for u, n, _ in out.sources}
    assert served[first] > 0 and served[second] > 0 and sum(served.values()) == SIZE


def test_the_caller_headers_go_only_to_the_urls_origin(session, tmp_path, origin, mirror):
    first = f"{origin.url}/bytes/{SIZE}?seed=h&rate=4000000&key=h1"
    second = f"{mirror.url}/bytes/{SIZE}?seed=h&rate=4000000&key=h2"
    fetch(session, tmp_path, first, sha256=body_sha256(SIZE, "h"), mirrors=(second,),
          headers={"Authorization": "Bearer s3cret"})  # fmt: skip
    assert all(r.headers.get("Authorization") for r in origin.stats.for_key("h1"))
    asked = mirror.stats.for_key("h2")
    assert asked and not any("Authorization" in r.headers for r in asked)


def test_a_mirror_of_another_size_is_dropped(session, tmp_path, origin, mirror):
    good = f"{origin.url}/bytes/{SIZE}?seed=z&rate=8000000&key=z1"
    other = f"{mirror.url}/bytes/{SIZE + 1}?seed=z&key=z2"
    out = fetch(session, tmp_path, good, sha256=body_sha256(SIZE, "z"), mirrors=(other,))
    assert out.sha256 == body_sha256(SIZE, "z")
    assert 1 <= len(mirror.stats.for_key("z2")) <= LIMITS.segments - 1  # those asking at once
    assert {u for u, n, _ in out.sources if n} == {good}


def test_a_dead_url_falls_back_to_a_mirror(session, tmp_path, origin, mirror):
    dead = f"{origin.url}/bytes/{SIZE}?status=404"
    alive = f"{mirror.url}/bytes/{SIZE}?seed=d"
    out = fetch(session, tmp_path, dead, sha256=body_sha256(SIZE, "d"), mirrors=(alive,))
    assert out.sha256 == body_sha256(SIZE, "d") and out.final_url == alive


def test_ranges_left_with_no_source_are_a_transient_failure_resumed_later(session, tmp_path,
                                                                          origin):  # fmt: skip
    url = f"{origin.url}/bytes/{SIZE}?seed=t&drop_after={2 * MIB}&key=t"
    with pytest.raises(TransientError, match="had no source left"):
        fetch(session, tmp_path, url, limits=replace(LIMITS, segments=2))
    saved = Target(tmp_path, "big.bin", url).load_ranges()
    assert saved is not None and sum(b - a for a, b in saved.missing) < SIZE


def test_a_permanent_failure_leaves_nothing(session, tmp_path, origin):
    url = f"{origin.url}/bytes/{SIZE}?seed=p&rate=8000000"
    with pytest.raises(PermanentError, match="sha256 mismatch"):
        fetch(session, tmp_path, url, sha256="0" * 64)
    # the mismatched body is not kept without a download id to keep it for
    assert sorted(p.name for p in (tmp_path / ".partial").iterdir()) == ["locks"]


def test_the_ranges_file_is_checked_before_it_is_trusted(tmp_path):
    good = Ranges(100, '"e"', "http://x/", [(0, 10), (20, 100)])
    assert Ranges.from_json(good.to_json()) == good
    for bad in (
        {"total": 100, "validator": '"e"', "url": "u", "missing": [[20, 10]]},
        {"total": 100, "validator": '"e"', "url": "u", "missing": [[0, 50], [40, 60]]},
        {"total": 100, "validator": '"e"', "url": "u", "missing": [[0, 101]]},
        {"total": 100, "validator": "", "url": "u", "missing": [[0, 1]]},
        {"total": "100", "validator": '"e"', "url": "u", "missing": [[0, 1]]},
        {"total": 100, "validator": '"e"', "url": "u", "missing": []},
        [1, 2],
    ):
        assert Ranges.from_json(json.dumps(bad).encode()) is None


def test_the_sweep_removes_an_abandoned_segmented_partial(tmp_path):
    target = Target(tmp_path, "big.bin", "http://127.0.0.1:1/x")
    (tmp_path / ".partial").mkdir()
    target.part_path.write_bytes(b"x")
    target.save_ranges(Ranges(10, '"e"', "http://127.0.0.1:1/x", [(1, 10)]))
    assert sweep_partials(tmp_path, max_age=0, now=2e9) == 2
    assert sorted(p.name for p in (tmp_path / ".partial").iterdir()) == []


def test_mirrors_are_checked_like_the_url():
    sha = "a" * 64
    with pytest.raises(PermanentError, match="mirrors: a sha256 is required"):
        parse((), {"url": "http://a/x", "mirrors": ["http://b/x"]})
    with pytest.raises(PermanentError, match=r"mirrors\[1\]: scheme must be http or https"):
        parse((), {"url": "http://a/x", "sha256": sha, "mirrors": ["http://b/x", "ftp://c/x"]})
    with pytest.raises(PermanentError, match="mirrors: expected a list of URLs"):
        parse((), {"url": "http://a/x", "sha256": sha, "mirrors": "http://b/x"})
    with pytest.raises(PermanentError, match="mirrors: at most 8"):
        parse((), {"url": "http://a/x", "sha256": sha, "mirrors": [f"http://m{i}/" for i in
                                                                   range(9)]})  # fmt: skip
    ok = parse((), {"url": "http://a/x", "sha256": sha, "mirrors": ["http://b/x", "http://a/x",
                                                                     "http://b/x"]})  # fmt: skip
    assert ok.mirrors == ("http://b/x",)


def test_segment_settings_are_checked():
    s = Settings.from_env({"DOWNLOAD_SEGMENTS": "8", "DOWNLOAD_SEGMENT_MIN": "32Mi",
                           "DOWNLOAD_SEGMENT_BELOW": "2M"})  # fmt: skip
    assert (s.segments, s.segment_min, s.segment_below) == (8, 32 * MIB, 2_000_000)
    assert Settings.from_env({}).segments == 1
    for var, raw in (("DOWNLOAD_SEGMENTS", "0"), ("DOWNLOAD_SEGMENTS", "17"),
                     ("DOWNLOAD_SEGMENT_MIN", "1k"), ("DOWNLOAD_SEGMENT_BELOW", "x")):  # fmt: skip
        with pytest.raises(SettingsError, match=var):
            Settings.from_env({var: raw})


def test_a_mirror_passes_the_same_address_checks_as_the_url(tmp_path, mirror):
    """Without DOWNLOAD_ALLOW_PRIVATE, a loopback mirror is refused before any connection, as
    the loopback URL is (both servers count the connections they accept: none)."""
    origin = OriginServer().start()
    strict = new_session(allow_private=False)
    mirrors = (f"{mirror.url}/bytes/1000",)
    request = DownloadRequest(url=f"{origin.url}/bytes/1000", dest="x.bin",
                              sha256=body_sha256(1000), mirrors=mirrors)  # fmt: skip
    try:
        with pytest.raises(PermanentError, match="not a public address"):
            download(strict, request, tmp_path, LIMITS)
    finally:
        strict.close()
        origin.stop()
    assert origin.stats.connections == 0 and mirror.stats.connections == 0


def test_a_failed_range_is_asked_again_from_where_it_stopped(session, tmp_path, origin):
    url = f"{origin.url}/bytes/{SIZE}?seed=r&rate=8000000&drop_after={MIB}&drop_times=3&key=r"
    out = fetch(session, tmp_path, url)
    assert out.sha256 == body_sha256(SIZE, "r")
    asked = ranges_asked(origin, "r")
    cut_at = {(r[0] if r else 0) + MIB for r in asked[:3]}  # where the first three stopped
    assert cut_at <= {r[0] for r in asked[3:] if r}  # each asked again from there, not before


def test_a_mirror_that_ignores_ranges_or_crawls_is_dropped(session, tmp_path, origin, mirror):
    good = f"{origin.url}/bytes/{SIZE}?seed=q&rate=3000000&key=q1"
    whole = f"{mirror.url}/bytes/{SIZE}?seed=q&norange=1&key=q2"
    crawl = f"{mirror.url}/bytes/{SIZE}?seed=q&rate=100000&key=q3"
    out = fetch(session, tmp_path, good, sha256=body_sha256(SIZE, "q"), mirrors=(whole, crawl))
    assert out.sha256 == body_sha256(SIZE, "q")
    served = {u: n for u, n, _ in out.sources}
    assert served.get(whole, 0) == 0 and served.get(crawl, 0) < MIB
    assert 1 <= len(mirror.stats.for_key("q2")) <= LIMITS.segments - 1


@pytest.mark.parametrize("part", [None, b"x" * MIB], ids=["no partial", "a short partial"])
def test_ranges_without_the_bytes_they_describe_are_not_trusted(session, tmp_path, origin, part):
    """A list of ranges whose partial is gone, or shorter than the bytes it says it holds (a
    crash between removals, a hand-made mess), is dropped and the body fetched whole."""
    url = f"{origin.url}/bytes/{SIZE}?seed=g&key=g-{part is None}"
    target = Target(tmp_path, "big.bin", url)
    (tmp_path / ".partial").mkdir()
    if part is not None:
        target.part_path.write_bytes(part)
    target.save_ranges(Ranges(SIZE, f'"g-{SIZE}"', url, [(2 * MIB, 3 * MIB)]))
    out = fetch(session, tmp_path, url)
    assert out.sha256 == body_sha256(SIZE, "g") and out.resumed_from == 0
    assert (tmp_path / "big.bin").read_bytes() == body(SIZE, "g")


def test_a_full_disk_mid_body_fails_clearly_and_leaves_nothing(session, tmp_path, origin):
    """ENOSPC from one connection's write (the disk filled by something else after the body
    was admitted): the download fails for good with the reason, every connection stops, and
    neither the partial nor its ranges stay."""
    url = f"{origin.url}/bytes/{SIZE}?seed=f&rate=8000000"
    real, written = os.pwrite, [0]

    def filling(fd: int, data, offset: int) -> int:
        written[0] += len(data)
        if written[0] > SIZE // 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    segments.os.pwrite = filling  # type: ignore[attr-defined]
    try:
        with pytest.raises(PermanentError, match="disk full while writing the body"):
            fetch(session, tmp_path, url)
    finally:
        segments.os.pwrite = real  # type: ignore[attr-defined]
    assert sorted(p.name for p in (tmp_path / ".partial").iterdir()) == ["locks"]
    assert not (tmp_path / "big.bin").exists()
