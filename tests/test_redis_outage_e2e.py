"""Redis goes away and comes back: workers reconnect, accepted tasks are not lost, and a worker
recycling its children keeps consuming afterwards (celery#7800)."""

from __future__ import annotations

from celery import Celery

from tests.conftest import run, submit
from tests.harness import RedisServer, Worker, wait_for, worker_env


def test_tasks_survive_a_redis_restart_and_consumption_goes_on(tmp_path, origin):
    server = RedisServer(tmp_path / "redis", persistent=True)
    (tmp_path / "redis").mkdir()
    server.start()
    client = Celery(broker=f"{server.url}/0", backend=f"{server.url}/1")
    client.conf.update(accept_content=["json"], broker_connection_retry_on_startup=True)
    env = worker_env(
        server.url,
        tmp_path / "dl",
        WORKER_MAX_TASKS_PER_CHILD="2",
        DOWNLOAD_SOFT_TIME_LIMIT="15",
        DOWNLOAD_TIME_LIMIT="20",
        DOWNLOAD_VISIBILITY_TIMEOUT="30",
    )
    w = Worker(env, "outage", "outage", tmp_path / "worker.log", tmp_path / "dl", ["-c", "2"])
    w.start(client)
    try:
        for i in range(3):
            assert run(client, w, url=f"{origin.url}/bytes/1000?seed=b{i}", dest=f"b{i}")
        # Two slow downloads run, three more wait in the queue, when Redis goes away.
        slow = [
            submit(client, w, url=f"{origin.url}/bytes/600000?rate=300000&seed=s{i}", dest=f"s{i}")
            for i in range(2)
        ]
        queued = [
            submit(client, w, url=f"{origin.url}/bytes/1000?seed=q{i}", dest=f"q{i}")
            for i in range(3)
        ]
        wait_for(lambda: all(r.state == "PROGRESS" for r in slow), 30, "both slow downloads")
        server.stop()
        server.start()
        for r in slow + queued:
            assert r.get(timeout=90)["size"] in (600000, 1000)
        # Children keep being recycled (max 2 tasks each) and the worker keeps consuming.
        after = [
            run(client, w, url=f"{origin.url}/bytes/1000?seed=a{i}", dest=f"a{i}", timeout=60)
            for i in range(6)
        ]
        assert [r["size"] for r in after] == [1000] * 6
    finally:
        w.stop()
        server.stop()
