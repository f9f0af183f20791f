"""The whole path end to end: a plain Celery client submits by name to a real worker process,
which downloads from the loopback origin into its DOWNLOAD_DIR."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from download_client import RESULT_KEYS
from tests.conftest import partial_of, run, submit
from tests.harness import wait_for
from tests.server import body_sha256


def test_a_download_lands_complete_with_every_result_field(client, worker, origin, dest):
    url = f"{origin.url}/bytes/2500000?seed=e2e&ctype=image/png"
    result = run(client, worker, url=url, dest=dest)
    assert tuple(result) == RESULT_KEYS
    path = Path(worker.download_dir) / dest
    assert hashlib.sha256(path.read_bytes()).hexdigest() == body_sha256(2500000, "e2e")
    assert result["path"] == dest and result["size"] == 2500000
    assert result["sha256"] == body_sha256(2500000, "e2e")
    assert result["url"] == url and result["final_url"] == url
    assert result["content_type"] == "image/png" and result["http_status"] == 200
    assert result["attempts"] == 1 and result["resumed_from"] == 0
    assert result["skipped"] is False and result["elapsed_s"] >= 0
    assert result["worker"] == worker.hostname
    assert not partial_of(worker.download_dir, dest, url).exists()


def test_default_destination_from_the_url(client, worker, origin):
    result = run(client, worker, url=f"{origin.url}/bytes/1000?seed=named")
    assert result["path"].startswith("1000-") and len(result["path"]) == len("1000-") + 10
    assert (Path(worker.download_dir) / result["path"]).stat().st_size == 1000


def test_the_destination_only_ever_holds_the_complete_file(client, worker, origin, dest):
    size = 600_000
    res = submit(client, worker, url=f"{origin.url}/bytes/{size}?rate=400000&seed=slow", dest=dest)
    path = Path(worker.download_dir) / dest
    sizes: set[int] = set()

    def look() -> bool:
        """Note the size whenever the file is there; done once the task is."""
        if path.exists():
            sizes.add(path.stat().st_size)
        return bool(res.ready())

    wait_for(lambda: res.state == "PROGRESS", 30, "the body to be on its way")
    assert not path.exists()  # mid-body: nothing at the destination yet
    wait_for(look, 30, "the download to end")
    res.get(timeout=30)
    sizes.add(path.stat().st_size)
    assert sizes == {size}  # whenever it was there, it was whole
    assert hashlib.sha256(path.read_bytes()).hexdigest() == body_sha256(size, "slow")


def test_progress_is_reported_while_running(client, worker, origin, dest):
    res = submit(client, worker, url=f"{origin.url}/bytes/800000?rate=400000", dest=dest)
    info = wait_for(lambda: res.state == "PROGRESS" and res.info, 30, "a PROGRESS state")
    assert info["total"] == 800000 and 0 < info["bytes"] <= 800000
    assert res.get(timeout=30)["size"] == 800000


def test_a_bad_argument_fails_at_once_with_a_clear_message(client, worker, origin):
    res = submit(client, worker, url=f"{origin.url}/bytes/10", colour="blue")
    with pytest.raises(Exception, match="unknown argument 'colour'"):
        res.get(timeout=30)
    assert res.state == "FAILURE"


def test_200_downloads_reuse_a_handful_of_connections(client, worker, origin):
    before = origin.stats.connections
    results = [
        submit(client, worker, url=f"{origin.url}/bytes/16384?seed=c{i}", dest=f"many/{i}.bin")
        for i in range(200)
    ]
    sizes = [r.get(timeout=60)["size"] for r in results]
    assert sizes == [16384] * 200
    opened = origin.stats.connections - before
    assert opened <= 4, f"{opened} TCP connections for 200 downloads through 2 children"


def test_each_child_makes_its_own_session_after_fork(client, start_worker):
    w = start_worker(extra=["--include", "tests.probe"])
    infos = [
        client.send_task("tests.probe.session_info", queue=w.queue).get(timeout=30)
        for _ in range(8)
    ]
    children = set(w.children())
    for info in infos:
        assert info["pid"] in children and info["session_made_in"] == info["pid"]
        assert info["parent"] == w.proc.pid
    by_pid: dict[int, set[int]] = {}
    for info in infos:
        by_pid.setdefault(info["pid"], set()).add(info["session_id"])
    assert all(len(ids) == 1 for ids in by_pid.values()), "one session per child, reused"


def test_a_threads_pool_gives_each_thread_its_own_session(client, start_worker, origin):
    w = start_worker(extra=["-P", "threads", "--include", "tests.probe"])
    infos = [
        client.send_task("tests.probe.session_info", queue=w.queue).get(timeout=30)
        for _ in range(10)
    ]
    assert {i["pid"] for i in infos} == {w.proc.pid}  # no children in this pool
    assert all(i["session_made_in"] == w.proc.pid for i in infos)
    by_thread: dict[int, set[int]] = {}
    for info in infos:
        by_thread.setdefault(info["thread"], set()).add(info["session_id"])
    assert all(len(ids) == 1 for ids in by_thread.values())
    assert len({next(iter(ids)) for ids in by_thread.values()}) == len(by_thread)
    assert run(client, w, url=f"{origin.url}/bytes/5000", dest="threads.bin")["size"] == 5000


def _pids(client, w, n):
    """Run n probe tasks one after another; return the pid of the child that ran each."""
    return [
        client.send_task("tests.probe.session_info", queue=w.queue).get(timeout=30)["pid"]
        for _ in range(n)
    ]


def test_children_are_recycled_after_max_tasks(client, start_worker, origin):
    w = start_worker(WORKER_MAX_TASKS_PER_CHILD="2", extra=["--include", "tests.probe"])
    run(client, w, url=f"{origin.url}/bytes/2000?seed=r", dest="r/0")
    pids = _pids(client, w, 8)
    counts = {pid: pids.count(pid) for pid in pids}
    assert max(counts.values()) <= 2 and len(counts) >= 4, counts
    wait_for(lambda: len(w.children()) == 2, 30, "two children again")


def test_children_are_recycled_past_the_memory_cap(client, start_worker, origin):
    # 1000 KiB is below any child's peak RSS, so every child is replaced after each task.
    w = start_worker(WORKER_MAX_MEMORY_PER_CHILD="1000", extra=["--include", "tests.probe"])
    assert run(client, w, url=f"{origin.url}/bytes/2000?seed=m", dest="m/0")["size"] == 2000
    pids = _pids(client, w, 4)
    assert len(set(pids)) == 4, pids
    wait_for(lambda: len(w.children()) == 2, 30, "two children again")
