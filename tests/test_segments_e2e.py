"""Segmented downloads with real workers: a child SIGKILLed mid-way leaves its ranges, and the
next run asks the origin only for those (counted at the origin); extra connections take origin
slots only when they are free; the download reports progress and its result as one download."""

from __future__ import annotations

import os
import signal
import time
import uuid

from tasks.core.storage import Target
from tests.conftest import active_pid, submit
from tests.harness import wait_for
from tests.server import OriginServer, body_sha256

MiB = 2**20
SIZE = 48 * MiB
SEGMENTS = 4
# A response closed early (its range taken by another connection) ends at the origin only at
# its next write, within 50 ms at these rates: not a connection more.
GRACE = 0.25
SEGMENTED = {"DOWNLOAD_SEGMENTS": str(SEGMENTS), "DOWNLOAD_SEGMENT_MIN": "8Mi"}


def _ranges(origin, key: str, after: int = 0) -> list[tuple[int, int] | None]:
    return origin.stats.ranges(key, SIZE)[after:]


def test_a_killed_child_leaves_its_ranges_and_the_next_run_asks_only_for_them(
    start_worker, client, origin, tmp_path
) -> None:
    w = start_worker(download_dir=tmp_path, queue=f"seg-{uuid.uuid4().hex[:6]}", **SEGMENTED)
    key = uuid.uuid4().hex[:8]
    url = f"{origin.url}/bytes/{SIZE}?seed={key}&rate=4000000&key={key}"
    target = Target(tmp_path, "big.bin", url)
    res = submit(client, w, url=url, dest="big.bin")

    def a_third_in() -> bool:
        saved = target.load_ranges()
        return saved is not None and sum(b - a for a, b in saved.missing) < SIZE * 2 // 3

    wait_for(a_third_in, 60, "a third of the body in the file")
    os.kill(active_pid(client, w, res.id), signal.SIGKILL)
    saved = target.load_ranges()  # read before any next run is admitted and writes it again
    killed_after = len(origin.stats.for_key(key))
    assert saved is not None and len(saved.missing) >= 2  # holes between segments
    result = res.get(timeout=120)
    assert result["sha256"] == body_sha256(SIZE, key)
    missing = sum(b - a for a, b in saved.missing)
    assert result["resumed_from"] >= SIZE - missing
    again = _ranges(origin, key, killed_after)
    assert again and None not in again  # no request for the whole body
    for a, b in again:  # type: ignore[misc]
        assert any(x <= a and b <= y for x, y in saved.missing), (a, b, saved.missing)
    assert sum(b - a for a, b in again) <= missing  # type: ignore[misc]
    assert (tmp_path / "big.bin").stat().st_size == SIZE


def test_extra_connections_take_only_free_origin_slots_and_report_as_one_download(
    start_worker, client, origin, tmp_path
) -> None:
    w = start_worker(download_dir=tmp_path, queue=f"seg-{uuid.uuid4().hex[:6]}", concurrency=2,
                     DOWNLOAD_HOST_CONCURRENCY="2", **SEGMENTED)  # fmt: skip
    tag = uuid.uuid4().hex[:8]
    # One slot of the origin's two is held by a download that waits to be released.
    holder = submit(client, w, url=f"{origin.url}/bytes/{4 * MiB}?seed={tag}&hold={tag}",
                    dest="held.bin")  # fmt: skip
    wait_for(lambda: origin.stats.for_key(f"/bytes/{4 * MiB}") or holder.state == "PROGRESS",
             30, "the holder to ask")  # fmt: skip
    url = f"{origin.url}/bytes/{SIZE}?seed={tag}&rate=16000000&key=one-{tag}"
    seen: set[str] = set()
    progress: list[dict] = []
    res = submit(client, w, url=url, dest="one.bin")
    while not res.ready():
        seen.add(res.state)
        if res.state == "PROGRESS" and isinstance(res.info, dict):
            progress.append(res.info)
        time.sleep(0.05)
    result = res.get(timeout=5)
    origin.release(tag)
    holder.get(timeout=60)
    assert "WAITING" not in seen  # it never waited for the slots it could not have
    assert origin.stats.most_at_once(f"one-{tag}", GRACE) == 1  # the one slot left, and no more
    assert result["sha256"] == body_sha256(SIZE, tag)
    assert progress and all(p["total"] == SIZE for p in progress)  # one download's progress
    assert result["sources"] == [{"url": result["url"], "bytes": SIZE, "requests": 1}]

    # The slots free again: the same origin now gives it its four connections.
    url2 = f"{origin.url}/bytes/{SIZE}?seed={tag}2&rate=8000000&key=four-{tag}"
    result = submit(client, w, url=url2, dest="four.bin").get(timeout=120)
    assert result["sha256"] == body_sha256(SIZE, f"{tag}2")
    assert origin.stats.most_at_once(f"four-{tag}", GRACE) == 2  # the origin's cap, fleet-wide


def test_a_resetting_mirror_and_an_origin_ignoring_ranges(start_worker, client, origin, tmp_path):
    """Two URLs for one body, the download's own resetting every connection after 1 MiB: the
    healthy one serves nearly all of it. Then an origin that answers a range with the whole
    body: one range asked, the body written once, from the first response."""
    w = start_worker(download_dir=tmp_path, queue=f"seg-{uuid.uuid4().hex[:6]}", **SEGMENTED)
    tag = uuid.uuid4().hex[:8]
    mirror = OriginServer().start()
    try:
        bad = f"{mirror.url}/bytes/{SIZE}?seed={tag}&drop_after={MiB}&key=bad-{tag}"
        good = f"{origin.url}/bytes/{SIZE}?seed={tag}&rate=16000000&key=good-{tag}"
        sha = body_sha256(SIZE, tag)
        result = submit(client, w, url=bad, sha256=sha, mirrors=[good], dest="m.bin").get(
            timeout=120
        )
    finally:
        mirror.stop()
    assert result["sha256"] == sha
    served = {s["url"]: s["bytes"] for s in result["sources"]}
    # The resetting one is dropped after 3 failures in a row (and those asking it meanwhile).
    assert sum(served.values()) == SIZE and len(served) == 2
    assert served[result["url"]] <= 2 * SEGMENTS * MiB  # the rest from the healthy one

    whole = f"{origin.url}/bytes/{SIZE}?seed={tag}&norange=1&rate=32000000&key=whole-{tag}"
    result = submit(client, w, url=whole, dest="w.bin").get(timeout=120)
    assert result["sha256"] == body_sha256(SIZE, tag)
    assert [r is None for r in _ranges(origin, f"whole-{tag}")] == [True, False]
    assert [(s["bytes"], s["requests"]) for s in result["sources"]] == [(SIZE, 2)]
