"""Single flight across the fleet: identical downloads in flight at once cause one transfer,
whichever workers their tasks land on. Three workers (different hostnames) on one Redis and one
queue, sharing a DOWNLOAD_DIR, as on a shared volume."""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from celery import Celery

from tests.conftest import active_pid
from tests.harness import Worker, wait_for
from tests.server import OriginServer, body_sha256

SIZE = 1_500_000


@pytest.fixture(scope="module")
def fleet(
    start_worker: Callable[..., Worker], tmp_path_factory: pytest.TempPathFactory
) -> list[Worker]:
    shared = tmp_path_factory.mktemp("shared-volume")
    queue = f"fleet-{uuid.uuid4().hex[:6]}"
    return [start_worker(download_dir=shared, queue=queue) for _ in range(3)]


def _submit(client: Celery, fleet: list[Worker], n: int, **kwargs: object) -> list:
    return [
        client.send_task("downloads.fetch", kwargs=kwargs, queue=fleet[0].queue) for _ in range(n)
    ]


def _full_bodies(origin: OriginServer, key: str) -> int:
    return sum(1 for r in origin.stats.for_key(key) if "Range" not in r.headers)


def test_six_identical_submissions_make_one_transfer(client, fleet, origin, key):
    url = f"{origin.url}/bytes/{SIZE}?seed={key}&key={key}&rate=1500000"
    results = [r.get(timeout=60) for r in _submit(client, fleet, 6, url=url, dest=f"{key}.bin")]
    assert len(origin.stats.for_key(key)) == 1  # one request in all
    assert {r["sha256"] for r in results} == {body_sha256(SIZE, key)}
    assert sorted(r["skipped"] for r in results) == [False] + [True] * 5
    assert {r["worker"] for r in results} <= {w.hostname for w in fleet}
    assert (Path(fleet[0].download_dir) / f"{key}.bin").stat().st_size == SIZE


def test_different_headers_are_different_downloads(client, fleet, origin, key):
    url = f"{origin.url}/bytes/20000?seed={key}&key={key}&rate=100000"
    pending = [
        client.send_task(
            "downloads.fetch",
            kwargs={"url": url, "dest": f"{key}.bin", "headers": {"Authorization": f"Bearer {i}"}},
            queue=fleet[0].queue,
        )
        for i in range(3)
    ]
    results = [r.get(timeout=60) for r in pending]
    # Credentials differ: nobody shares. Each caller asks the origin with its own credentials,
    # one at a time (one destination): the first gets the body, the others a 304 for the file
    # already there (or the body again), never someone else's answer without asking.
    seen = sorted(r.headers.get("Authorization", "") for r in origin.stats.for_key(key))
    assert seen == ["Bearer 0", "Bearer 1", "Bearer 2"]
    assert sorted(r["http_status"] for r in results) in ([200, 304, 304], [200, 200, 200])


def test_a_leader_killed_mid_body_is_resumed_and_its_followers_share(client, fleet, origin, key):
    url = f"{origin.url}/bytes/{SIZE}?seed={key}&key={key}&rate=300000"
    leader = client.send_task(
        "downloads.fetch", kwargs={"url": url, "dest": f"{key}.bin"}, queue=fleet[0].queue
    )
    wait_for(lambda: leader.state == "PROGRESS" and leader.info["bytes"] > 200_000, 30, "body")
    followers = _submit(client, fleet, 3, url=url, dest=f"{key}.bin")
    runs_on = next(w for w in fleet if _runs(client, w, leader.id))
    os.kill(active_pid(client, runs_on, leader.id), signal.SIGKILL)
    first = leader.get(timeout=60)
    assert first["resumed_from"] > 0 and not first["skipped"]
    shared = [f.get(timeout=60) for f in followers]
    assert all(r["skipped"] and r["sha256"] == body_sha256(SIZE, key) for r in shared)
    assert _full_bodies(origin, key) == 1 and len(origin.stats.for_key(key)) == 2


def test_followers_of_a_404_ask_for_themselves(client, fleet, origin, key):
    url = f"{origin.url}/bytes/10?key={key}&status=404&stall=1"
    pending = _submit(client, fleet, 3, url=url, dest=f"{key}.bin")
    for res in pending:
        with pytest.raises(Exception, match="HTTP 404"):
            res.get(timeout=60)
    assert len(origin.stats.for_key(key)) == 3  # a failure is not shared: each asked once


def _runs(client: Celery, worker: Worker, task_id: str) -> bool:
    active = client.control.inspect([worker.hostname], timeout=1).active() or {}
    return any(t["id"] == task_id for t in active.get(worker.hostname, []))
