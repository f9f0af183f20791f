"""End to end: the real network's faults against real workers. Request counts are read at
the origin; the default worker retries 3 times with backoff capped at 0.3 s."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

import pytest

from tasks.core.storage import LOCKS
from tests.conftest import active_pid, failure, kill_each_delivery, partial_of, run, submit
from tests.harness import wait_for
from tests.server import OriginServer, body, body_sha256


def test_a_server_always_answering_500_gets_exactly_1_plus_max_retries_requests(
    client, worker, origin, key
):
    state, message = failure(client, worker, url=f"{origin.url}/bytes/10?status=500&key={key}")
    said = f"HTTP 500 Internal Server Error from {_host(origin)}, 4 attempts over "
    assert state == "FAILURE" and message.startswith(said), message
    assert len(origin.stats.for_key(key)) == 4


def test_a_404_is_requested_once_and_fails(client, worker, origin, key):
    state, message = failure(client, worker, url=f"{origin.url}/bytes/10?status=404&key={key}")
    assert state == "FAILURE" and message == f"HTTP 404 Not Found from {_host(origin)}"
    assert len(origin.stats.for_key(key)) == 1


def test_a_flaky_server_succeeds_on_the_third_request(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/5000?flaky=2&key={key}"
    result = run(client, worker, url=url, dest=dest)
    assert result["attempts"] == 3 and result["size"] == 5000
    assert len(origin.stats.for_key(key)) == 3


def test_retry_after_is_capped_by_the_backoff_maximum(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/100?flaky=1&fail=429&retry_after=3600&key={key}"
    result = run(client, worker, url=url, dest=dest, timeout=20)
    first, second = origin.stats.for_key(key)
    assert result["attempts"] == 2 and second.at - first.at < 60


def test_retry_after_is_waited_out_by_celery_not_by_a_sleeping_child(
    client, start_worker, origin, key
):
    w = start_worker(concurrency=1, DOWNLOAD_RETRY_BACKOFF_MAX="10")
    waiting = submit(
        client,
        w,
        url=f"{origin.url}/bytes/100?flaky=1&fail=503&retry_after=2&key={key}",
        dest="later.bin",
    )
    wait_for(lambda: origin.stats.for_key(key), 30, "the first request")
    # The only child is free while the first download waits for its retry.
    quick = run(client, w, url=f"{origin.url}/bytes/100?key={key}-quick", dest="quick.bin")
    assert quick["size"] == 100 and len(origin.stats.for_key(key)) == 1
    assert waiting.get(timeout=30)["attempts"] == 2
    first, second = origin.stats.for_key(key)
    assert second.at - first.at >= 1.9


def test_a_cut_connection_resumes_where_it_stopped(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/1000000?seed={key}&cut=300000&cut_times=1&key={key}"
    result = run(client, worker, url=url, dest=dest)
    assert result["resumed_from"] == 300000 and result["attempts"] == 2
    assert result["http_status"] == 206 and result["sha256"] == body_sha256(1000000, key)
    first, second = origin.stats.for_key(key)
    assert "Range" not in first.headers and second.headers["Range"] == "bytes=300000-"
    assert second.headers["Accept-Encoding"] == "identity"


def test_a_body_always_shorter_than_its_length_is_never_saved(client, worker, origin, key, dest):
    state, message = failure(
        client, worker, url=f"{origin.url}/bytes/50000?short=100&key={key}", dest=dest
    )
    said = rf"connection closed by {_host(origin)} after 100 B of 48\.8 KiB, 4 attempts over "
    assert state == "FAILURE" and re.match(said, message), message
    assert not (Path(worker.download_dir) / dest).exists()
    assert len(origin.stats.for_key(key)) == 4
    assert all(r.headers.get("Range") != "bytes=0-" for r in origin.stats.for_key(key))


def test_a_stall_after_the_headers_times_out_and_is_retried(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/5000?stall=4&stall_times=1&key={key}"
    result = run(client, worker, url=url, dest=dest)
    assert result["attempts"] == 2 and result["size"] == 5000


def test_the_soft_time_limit_stops_a_trickle_and_keeps_the_partial(
    client, start_worker, worker, origin, key, dest
):
    slow = start_worker(
        download_dir=worker.download_dir, DOWNLOAD_SOFT_TIME_LIMIT="1", DOWNLOAD_TIME_LIMIT="10"
    )
    url = f"{origin.url}/bytes/1200000?rate=300000&seed={key}&key={key}"
    state, message = failure(client, slow, url=url, dest=dest)
    assert state == "FAILURE" and "DOWNLOAD_SOFT_TIME_LIMIT" in message
    assert not (Path(worker.download_dir) / dest).exists()
    kept = partial_of(worker.download_dir, dest, url).stat().st_size
    assert 0 < kept < 1200000
    result = run(client, worker, url=url, dest=dest)  # submitted again: it resumes
    assert result["resumed_from"] == kept and result["sha256"] == body_sha256(1200000, key)


def test_two_tasks_never_write_one_destination_at_once(client, worker, origin, key, dest):
    slow = submit(client, worker, url=f"{origin.url}/bytes/400000?rate=400000&seed=a", dest=dest)
    wait_for(lambda: slow.state == "PROGRESS", 30, "the slow download to start")
    fast = submit(client, worker, url=f"{origin.url}/bytes/1000?seed=b&key={key}", dest=dest)
    assert slow.get(timeout=30)["size"] == 400000
    assert fast.get(timeout=30)["size"] == 1000
    assert client.backend.client.get(f"downloads:retry:{fast.id}") is None  # a wait, no fault
    assert (Path(worker.download_dir) / dest).read_bytes() == body(1000, "b")


def test_submitting_again_does_not_download_again(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/30000?seed={key}&key={key}"
    first = run(client, worker, url=url, dest=dest)
    again = run(client, worker, url=url, dest=dest)
    assert not first["skipped"] and again["skipped"] and again["http_status"] == 304
    assert again["sha256"] == first["sha256"]
    with_sum = run(client, worker, url=url, dest=dest, sha256=first["sha256"])
    assert with_sum["skipped"] and with_sum["http_status"] is None
    assert len(origin.stats.for_key(key)) == 2  # the checksum made no request at all


def test_a_child_killed_mid_download_is_redelivered_and_resumes(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/1500000?rate=500000&seed={key}&key={key}"
    res = submit(client, worker, url=url, dest=dest)
    wait_for(lambda: res.state == "PROGRESS" and res.info["bytes"] > 100000, 30, "progress")
    os.kill(active_pid(client, worker, res.id), signal.SIGKILL)
    result = res.get(timeout=60)
    assert result["resumed_from"] > 0 and result["attempts"] == 2
    assert result["sha256"] == body_sha256(1500000, key)


def test_a_message_that_kills_its_child_every_time_is_failed(client, start_worker, origin, key):
    w = start_worker(DOWNLOAD_MAX_DELIVERIES="2")
    url = f"{origin.url}/bytes/3000000?rate=300000&key={key}&noetag=1&nolm=1"
    res = submit(client, w, url=url, dest="poison.bin")
    kill_each_delivery(client, w, origin, key, res.id, 2)
    with pytest.raises(Exception, match="died each time"):
        res.get(timeout=60)
    assert len(origin.stats.for_key(key)) == 2


def test_sigterm_lets_the_running_download_finish(client, start_worker, origin, key):
    w = start_worker()
    res = submit(client, w, url=f"{origin.url}/bytes/900000?rate=600000&key={key}", dest="warm")
    wait_for(lambda: res.state == "PROGRESS", 30, "the download to run")
    assert w.stop(signal.SIGTERM, timeout=30) == 0
    assert res.get(timeout=10)["size"] == 900000
    assert (w.download_dir / "warm").stat().st_size == 900000


def test_revoke_with_terminate_leaves_nothing_behind(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/3000000?rate=500000&key={key}"
    res = submit(client, worker, url=url, dest=dest)
    wait_for(lambda: res.state == "PROGRESS", 30, "the download to run")
    client.control.revoke(res.id, terminate=True)
    wait_for(lambda: res.state == "REVOKED", 30, "state REVOKED")
    part = partial_of(worker.download_dir, dest, url)
    wait_for(lambda: not part.exists(), 30, "the partial to be removed")
    # The next task on this worker runs; the revoked one never ran again.
    run(client, worker, url=f"{origin.url}/bytes/10?key={key}-next", dest=f"{dest}.next")
    assert not (Path(worker.download_dir) / dest).exists()
    assert len(origin.stats.for_key(key)) == 1


def test_the_sweep_removes_only_what_nobody_uses(tmp_path):
    from tasks.core.storage import Target
    from tasks.core.sweep import sweep_partials

    area = tmp_path / ".partial"
    area.mkdir()

    def plant(name: str, old: bool = True) -> None:
        (area / name).write_bytes(b"x")
        if old:
            os.utime(area / name, (0, 0))

    for name in ("a.part", "a.json", "c.json", "d.json.tmp", "f.lock"):
        plant(name)  # abandoned: a partial with its validators, orphans, a lock nobody holds
    for name in ("b.part", "b.json", "e.json"):
        plant(name, old=False)  # recent; e.json is written just before its partial is created
    busy = Target(tmp_path, "busy.bin", "u")
    with busy.locked():
        f, _ = busy.open_partial(0)
        os.utime(busy.part_path, (0, 0))  # looks abandoned, but its task holds it
        assert sweep_partials(tmp_path, max_age=3600) == 5
        assert busy.part_path.exists()
        f.close()
    left = sorted(p.name for p in area.iterdir())
    assert left == sorted(["b.part", "b.json", "e.json", busy.part_path.name, LOCKS])


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up for real."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=2m tmpfs {mnt} 2>/dev/null"):
        pytest.skip("mounting a tmpfs needs root and mount(8); cannot make a small disk here")
    yield mnt
    os.system(f"umount -l {mnt}")


def test_a_full_disk_fails_cleanly_and_the_worker_goes_on(client, start_worker, origin, small_disk):
    w = start_worker(download_dir=small_disk)
    # Content-Length known: refused before the body.
    state, message = failure(client, w, url=f"{origin.url}/bytes/5000000", dest="big.bin")
    assert state == "FAILURE" and "disk full" in message
    # No length: the disk fills mid-body (ENOSPC), what was written is removed.
    state, message = failure(client, w, url=f"{origin.url}/bytes/1?endless=1", dest="endless")
    assert state == "FAILURE" and "disk full" in message
    assert not (small_disk / "big.bin").exists() and not (small_disk / "endless").exists()
    assert os.listdir(small_disk / ".partial") == [LOCKS]  # no partial or validators
    assert run(client, w, url=f"{origin.url}/bytes/100000", dest="ok.bin")["size"] == 100000


@pytest.mark.parametrize(
    ("framing", "shown"),
    [
        ("clen=-5", "'-5'"),
        ("clen=ten", "'ten'"),
        ("clen=%2B10", "'+10'"),
        ("clen=", "''"),
        ("clen=10&clen2=5", "'10, 5'"),
        ("clen=10,%205", "'10, 5'"),
    ],
)
def test_an_invalid_content_length_fails_at_once(client, worker, origin, key, dest, framing, shown):
    """RFC 9112 6.3: a response whose length cannot be known is unrecoverable, not retried."""
    url = f"{origin.url}/bytes/10?{framing}&key={key}"
    res = submit(client, worker, url=url, dest=dest)
    with pytest.raises(Exception) as info:
        res.get(timeout=30)
    assert res.state == "FAILURE" and type(info.value).__name__ == "PermanentError"
    assert f"the server's response is malformed: invalid Content-Length {shown}" in str(info.value)
    assert len(origin.stats.for_key(key)) == 1
    assert not (Path(worker.download_dir) / dest).exists()
    assert not partial_of(worker.download_dir, dest, url).exists()


@pytest.mark.parametrize("framing", ["clen=10&clen2=10", "clen=10,%2010", "chunked=1&clen=3"])
def test_repeated_lengths_and_chunked_framing_are_accepted(
    client, worker, origin, key, dest, framing
):
    url = f"{origin.url}/bytes/10?seed={key}&{framing}&key={key}"
    result = run(client, worker, url=url, dest=dest)
    assert result["size"] == 10 and result["sha256"] == body_sha256(10, key)
    assert (Path(worker.download_dir) / dest).read_bytes() == body(10, key)


def _host(origin: OriginServer) -> str:
    """127.0.0.1:port, as failure messages name the origin."""
    return origin.url.removeprefix("http://")
