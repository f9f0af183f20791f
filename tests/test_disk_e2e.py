"""Disk reservations with real workers on a volume of their own (a tmpfs each test mounts and
removes): a batch larger than the volume runs as far as it fits while a consumer moves finished
files off, and none fails for space; a SIGKILLed child's reservation comes back within the
lease; a body of unknown size reserves a step at a time and, when no step fits, waits (parked,
its partial resumed, where the origin can resume; in place, where it cannot) and never takes the
volume past its margin. Operators see it in `downloads status`, the metrics and Flower."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tasks.core.budgets import LEASE_MS
from tests.conftest import active_pid, partials, submit
from tests.harness import Worker, cli, wait_for, worker_env
from tests.server import body_sha256

MiB = 2**20


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """Mount a tmpfs of `size` bytes for the test's workers; lazily unmounted at the end."""
    mounted: list[Path] = []

    def make(size: int) -> Path:
        where = tmp_path / f"vol{len(mounted)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


@pytest.fixture
def on_volume(mount, start_worker, redis_server) -> Callable[..., tuple[Path, Worker]]:
    """A worker of its own on a new volume of `size` bytes, with these settings."""

    def start(size: int, **settings: str) -> tuple[Path, Worker]:
        _fresh_redis(redis_server)
        vol = mount(size)
        queue = f"disk-{uuid.uuid4().hex[:6]}"
        return vol, start_worker(download_dir=vol, queue=queue, concurrency=2, **settings)

    return start


class Watch:
    """Polls the volume while the test runs: the fewest bytes free, the most partial files in
    the in-progress area and the most live reservations in Redis at one time."""

    def __init__(self, root: Path, redis_url: str) -> None:
        self.root, self.stop = root, threading.Event()
        self.client = redis.Redis.from_url(f"{redis_url}/1")
        self.least_free, self.most_partials, self.most_holders = 2**63, 0, 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self.client.close()

    def holders(self) -> int:
        seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        return sum(int(self.client.zcount(k, now_ms, "+inf"))
                   for k in self.client.scan_iter(match="downloads:disk:*:slots"))  # fmt: skip

    def _run(self) -> None:
        while not self.stop.wait(0.01):
            st = os.statvfs(self.root)
            self.least_free = min(self.least_free, st.f_bavail * st.f_frsize)
            self.most_partials = max(self.most_partials, len(partials(self.root)))
            self.most_holders = max(self.most_holders, self.holders())


def _fresh_redis(redis_server) -> None:
    """Reservations of earlier tests' volumes are gone (each test mounts a new volume)."""
    c = redis.Redis.from_url(f"{redis_server.url}/1")
    for key in c.scan_iter(match="downloads:disk*"):
        c.delete(key)
    c.close()


def test_a_batch_larger_than_the_volume_runs_as_far_as_it_fits_and_none_fails(
    start_worker, origin, client, redis_server, mount, tmp_path, flower
) -> None:
    _fresh_redis(redis_server)
    vol, out = mount(350 * MiB), tmp_path / "consumer"
    out.mkdir()
    queue = f"disk-{uuid.uuid4().hex[:6]}"
    margin = 40 * MiB  # 310 MiB to reserve: three bodies of 100 MiB at a time
    settings = {"DOWNLOAD_DISK_MARGIN": str(margin), "DOWNLOAD_READ_TIMEOUT": "10"}
    # Two workers on the one volume: the budget is the fleet's, not a worker's.
    workers = [start_worker(download_dir=vol, queue=queue, concurrency=4, **settings)
               for _ in range(2)]  # fmt: skip
    tag = uuid.uuid4().hex[:6]
    urls = [f"{origin.url}/bytes/{100 * MiB}?seed={tag}{i}&rate=60000000" for i in range(8)]
    try:
        with Watch(vol, redis_server.url) as watch:
            batch = [submit(client, workers[0], url=u, dest=f"big/{i}.bin")
                     for i, u in enumerate(urls)]  # fmt: skip
            waiting = wait_for(lambda: _waiting_for_disk(batch), 60, "a download WAITING for disk")
            _operators_see_it(redis_server, tmp_path, queue, flower, waiting)
            results = _consume(batch, vol, out)
    finally:
        for w in workers:
            w.stop()
    assert [r["size"] for r in results] == [100 * MiB] * 8
    assert [r["sha256"] for r in results] == [body_sha256(100 * MiB, f"{tag}{i}") for i in range(8)]
    assert sum(r["waited_s"] > 0 for r in results) >= 5  # they waited: none failed for space
    assert 1 <= watch.most_holders <= 3 and watch.most_partials <= 3, vars(watch)
    assert watch.least_free >= margin, watch.least_free


def _waiting_for_disk(batch: list) -> dict | None:
    for r in batch:
        if r.state == "WAITING" and isinstance(r.info, dict) and r.info.get("reason") == "disk":
            return {"id": r.id, **r.info}
    return None


def _operators_see_it(redis_server, tmp_path, queue: str, flower, waiting: dict) -> None:
    assert waiting["need"] == 100 * MiB and waiting["volume"].startswith("vol-")
    env = worker_env(redis_server.url, tmp_path)
    shown = json.loads(cli(env, "status", "--queue", queue, "--json").stdout)["disks"]
    volume = shown[waiting["volume"]]
    assert volume["waiting"] >= 1 and volume["reserved"] <= 3 * 100 * MiB, volume
    assert volume["margin"] == 40 * MiB
    assert "disk reservations:" in cli(env, "status", "--queue", queue).stdout
    assert flower.metric("downloads_disk_margin_bytes", volume=waiting["volume"]) == 40 * MiB

    def in_flower() -> bool:
        info = flower.info(waiting["id"]) or {}
        return "of room on volume" in json.loads(info.get("result") or "{}").get("waiting", "")

    wait_for(in_flower, 30, "Flower to show the download waiting for room")


def _consume(batch: list, vol: Path, out: Path) -> list[dict]:
    """Move each finished file off the volume as a consumer would, until all have ended."""
    results: dict[int, dict] = {}
    deadline = time.monotonic() + 240
    while len(results) < len(batch):
        assert time.monotonic() < deadline, f"{len(results)} of {len(batch)} ended"
        for i, r in enumerate(batch):
            if i not in results and r.ready():
                results[i] = r.get(timeout=1)  # raises if any failed
                shutil.move(vol / results[i]["path"], out / f"{i}.bin")
        time.sleep(0.05)
    return [results[i] for i in range(len(batch))]


def test_a_child_killed_mid_body_gives_its_reservation_back_within_the_lease(
    on_volume, origin, client, redis_server
) -> None:
    vol, w = on_volume(350 * MiB, DOWNLOAD_DISK_MARGIN="40Mi", DOWNLOAD_READ_TIMEOUT="10")
    tag = uuid.uuid4().hex[:6]
    try:
        # 200 MiB each: the second does not fit beside the first's reservation.
        first = submit(client, w, url=f"{origin.url}/bytes/{200 * MiB}?seed={tag}a&rate=20000000")
        wait_for(lambda: first.state == "PROGRESS", 30, "the first to be writing")
        second = submit(client, w, url=f"{origin.url}/bytes/{200 * MiB}?seed={tag}b")
        wait_for(lambda: second.state == "WAITING", 30, "the second to wait for room")
        wait_for(lambda: len(partials(vol)) == 1 and partials(vol)[0].stat().st_size > 20 * MiB,
                 30, "bytes on disk")  # fmt: skip
        os.kill(active_pid(client, w, first.id), signal.SIGKILL)
        killed = time.monotonic()
        # The dead child's lease ends unrenewed; the sweep then wakes the second.
        wait_for(lambda: second.state in ("PROGRESS", "SUCCESS"), 30, "the second to run")
        assert time.monotonic() - killed <= LEASE_MS / 1000 + 2.5
        results = [second.get(timeout=120)]
        (vol / results[0]["path"]).unlink()  # consumed: now the first's rest fits again
        results.append(first.get(timeout=60))
        with Watch(vol, redis_server.url) as watch:
            assert watch.holders() == 0  # every reservation given back
    finally:
        w.stop()
    assert results[0]["sha256"] == body_sha256(200 * MiB, f"{tag}b")
    assert results[1]["sha256"] == body_sha256(200 * MiB, f"{tag}a")
    assert results[1]["resumed_from"] > 20 * MiB  # the killed run's bytes were kept


def test_a_body_of_unknown_size_grows_a_step_at_a_time_and_waits_when_none_fits(
    on_volume, origin, client, redis_server
) -> None:
    """Resumable (validators, Range): it parks when no step fits, and resumes where it stopped.
    Not resumable: it waits in place, its connection open, and goes on once room appears."""
    margin = 8 * MiB
    vol, w = on_volume(64 * MiB, DOWNLOAD_READ_TIMEOUT="30", DOWNLOAD_DISK_MARGIN=str(margin),
                       DOWNLOAD_DISK_STEP="4Mi")  # fmt: skip
    blocker = vol / "someone-elses.bin"
    tag = uuid.uuid4().hex[:6]
    try:
        with Watch(vol, redis_server.url) as watch:
            # Unknown size, no room problem: it takes step after step (24 MiB in 4 MiB steps).
            free = submit(client, w, url=f"{origin.url}/bytes/{24 * MiB}?seed={tag}f&chunked=1")
            assert free.get(timeout=60)["size"] == 24 * MiB
            (vol / free.get()["path"]).unlink()

            blocker.write_bytes(b"\0" * 40 * MiB)  # 16 MiB left to reserve
            key = uuid.uuid4().hex
            url = f"{origin.url}/bytes/{24 * MiB}?seed={tag}r&chunked=1&key={key}"
            parked = submit(client, w, url=url)
            wait_for(lambda: _waiting_for_disk([parked]), 60, "the download to park for room")
            assert parked.info["need"] == 4 * MiB
            kept = partials(vol)[0].stat().st_size
            assert 0 < kept <= 16 * MiB
            blocker.unlink()  # a consumer frees room: the sweep wakes it
            result = parked.get(timeout=60)
            asked = [e.headers.get("Range") for e in origin.stats.for_key(key)]
            assert result["resumed_from"] == kept and asked == [None, f"bytes={kept}-"], asked
            (vol / result["path"]).unlink()

            blocker.write_bytes(b"\0" * 40 * MiB)
            plain = f"{origin.url}/bytes/{24 * MiB}?seed={tag}p&chunked=1&noetag=1&nolm=1"
            held = submit(client, w, url=plain)
            wait_for(lambda: _stuck_at(vol, 16 * MiB), 60, "the body to stop at its reservation")
            assert held.state in ("STARTED", "PROGRESS")  # its first run, waiting in place
            blocker.unlink()
            done = held.get(timeout=60)
    finally:
        w.stop()
    assert result["sha256"] == body_sha256(24 * MiB, f"{tag}r")
    assert done["sha256"] == body_sha256(24 * MiB, f"{tag}p") and done["attempts"] == 1
    assert watch.least_free >= margin, watch.least_free


def _stuck_at(vol: Path, most: int) -> bool:
    found = partials(vol)
    if len(found) != 1:
        return False
    first = found[0].stat().st_size
    time.sleep(0.5)  # it stays there: no more bytes come while there is no room
    return 0 < first == found[0].stat().st_size <= most


def test_a_body_that_can_never_fit_and_one_that_cannot_wait_fail_clearly(
    on_volume, origin, client, redis_server
) -> None:
    vol, w = on_volume(32 * MiB, DOWNLOAD_DISK_MARGIN="8Mi", DOWNLOAD_DISK_STEP="4Mi",
                       DOWNLOAD_MAX_RETRIES="0")  # fmt: skip
    try:
        with Watch(vol, redis_server.url) as watch:
            huge = submit(client, w, url=f"{origin.url}/bytes/{40 * MiB}")
            with pytest.raises(Exception, match="more than the volume can ever hold"):
                huge.get(timeout=30)
            # Endless, no validators: it fills what it may, waits DOWNLOAD_READ_TIMEOUT (2 s
            # here) for room, then gives the attempt up and drops what it wrote.
            endless = submit(client, w, url=f"{origin.url}/bytes/1?endless=1&noetag=1&nolm=1")
            with pytest.raises(Exception, match="cannot resume"):
                endless.get(timeout=60)
            assert watch.holders() == 0  # a failure gives its reservation back
    finally:
        w.stop()
    assert partials(vol) == []
    assert watch.least_free >= 8 * MiB, watch.least_free


def test_a_download_revoked_while_it_waits_gives_back_the_room_kept_for_it(
    on_volume, origin, client, redis_server
) -> None:
    vol, w = on_volume(350 * MiB, DOWNLOAD_DISK_MARGIN="40Mi", DOWNLOAD_READ_TIMEOUT="10")
    tag, size = uuid.uuid4().hex[:6], 200 * MiB
    try:
        first = submit(client, w, url=f"{origin.url}/bytes/{size}?seed={tag}a&rate=50000000")
        wait_for(lambda: first.state == "PROGRESS", 30, "the first to be writing")
        cancelled = submit(client, w, url=f"{origin.url}/bytes/{size}?seed={tag}b")
        wait_for(lambda: cancelled.state == "WAITING", 30, "the second to wait for room")
        last = submit(client, w, url=f"{origin.url}/bytes/{size}?seed={tag}c")
        wait_for(lambda: last.state == "WAITING", 30, "the third to wait behind it")
        client.control.revoke(cancelled.id)
        (vol / first.get(timeout=60)["path"]).unlink()  # room for the next: the cancelled one
        assert last.get(timeout=60)["sha256"] == body_sha256(size, f"{tag}c")
        keys = f"downloads:disk:{(vol / '.partial' / 'volume').read_text().strip()}"
        c = redis.Redis.from_url(f"{redis_server.url}/1")
        # Woken, then discarded as revoked: what was kept for it is given back, not left to
        # be published again every 30 s.
        wait_for(lambda: not c.hexists(f"{keys}:waking", cancelled.id), 20, "the kept room back")
        assert c.zscore(f"{keys}:slots", f"woken:{cancelled.id}") is None
        c.close()
    finally:
        w.stop()
    assert cancelled.state == "REVOKED"


def test_httpbins_bodies_reserve_their_room_and_give_it_back(on_volume, client, httpbin) -> None:
    """An origin nobody here wrote (its bodies are 100 KiB at most): one with a Content-Length,
    reserved as it says, and one streamed chunked without validators, reserved a step."""
    vol, w = on_volume(32 * MiB, DOWNLOAD_DISK_MARGIN="8Mi", DOWNLOAD_DISK_STEP="1Mi")
    try:
        with Watch(vol, w.env["CELERY_RESULT_BACKEND"].rsplit("/", 1)[0]) as watch:
            sized = submit(client, w, url=f"{httpbin.url}/bytes/102400?seed=3")
            streamed = submit(client, w, url=f"{httpbin.url}/stream-bytes/102400?seed=4")
            got = [sized.get(timeout=60), streamed.get(timeout=60)]
            assert watch.holders() == 0  # both given back
    finally:
        w.stop()
    assert [r["size"] for r in got] == [102400, 102400]
    assert all((vol / r["path"]).stat().st_size == r["size"] for r in got)
    assert watch.least_free >= 8 * MiB
