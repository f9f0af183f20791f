"""A worker SIGKILLed whole (main process and children) leaves what it held recorded in Redis
under a lease it no longer renews: another worker starts each of those messages again within a
minute (the lease, the last renewal, the next sweep), not after the visibility timeout (2 h)."""

from __future__ import annotations

import os
import signal
import uuid

import redis

from tests.harness import wait_for


def _held(r: redis.Redis, task_id: str) -> bool:
    return any(task_id.encode() in v for v in r.hvals("unacked"))


def test_a_killed_workers_running_and_waiting_messages_start_again_elsewhere(
    client, start_worker, origin, redis_server
):
    queue = f"recovery-{uuid.uuid4().hex[:6]}"
    first = start_worker(queue=queue, concurrency=1)
    key, other = f"rec-{uuid.uuid4().hex[:8]}", f"rec-{uuid.uuid4().hex[:8]}"
    slow = f"{origin.url}/bytes/60000/{key}?seed={key}&key={key}&rate=4000"
    url = f"{origin.url}/bytes/100/{other}?seed={other}"
    waiting = client.send_task("downloads.fetch", queue=queue, countdown=600,
                               kwargs={"url": url, "dest": f"{other}.bin"})  # fmt: skip
    running = client.send_task("downloads.fetch", queue=queue,
                               kwargs={"url": slow, "dest": f"{key}.bin"})  # fmt: skip
    broker = redis.Redis(port=redis_server.port, db=0)
    wait_for(lambda: origin.stats.for_key(key), 30, "the slow download to start")
    wait_for(lambda: _held(broker, running.id) and _held(broker, waiting.id), 30, "both held")
    second = start_worker(queue=queue, concurrency=1)

    assert first.proc is not None
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    before = len(origin.stats.for_key(key))
    wait_for(lambda: len(origin.stats.for_key(key)) > before, 60, "the running one to start again")
    result = running.get(timeout=120)
    assert result["worker"] == second.hostname
    wait_for(lambda: not _held(broker, running.id), 10, "the finished one acknowledged")
    # The one waiting for its countdown (received first: an ETA message does not fill the
    # prefetch) came back too: the living worker holds it now.
    wait_for(lambda: _held(broker, waiting.id) and waiting.id in second.log(), 30,
             "the waiting one held again")  # fmt: skip
    waiting.revoke()
