"""RabbitMQ as the broker, Redis as the result backend (results, claims, delivery counters): the
fault cases of the Redis setup against a private RabbitMQ node and real workers. Queues are
quorum queues and every countdown (a retry, a wait for a busy destination) is held by the
broker's delayed delivery, not by a worker."""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from celery import Celery
from kombu import Exchange, Queue

from download_client.brokers import rabbitmq_config
from download_client.groups import group_queue
from download_client.lanes import woken_lane
from download_client.settings import Settings
from tests import crowd
from tests.conftest import active_pid, run, submit
from tests.harness import RedisServer, Worker, cli, wait_for, worker_env
from tests.rabbitmq import RabbitServer, installed
from tests.server import body_sha256
from tests.test_deadlines_e2e import AHEAD, due_ahead_of_a_backlog
from tests.test_groups_e2e import (
    INTERLEAVED_BOUND,
    a_group_behind_a_backlog,
    a_group_behind_a_parked_backlog,
    forget_parked,
)
from tests.test_lanes_e2e import SLOTS, urgent_ahead_at_its_origin, urgent_ahead_of_a_backlog

if not installed():
    pytest.skip(
        "rabbitmq-server is not installed (Debian: apt-get install rabbitmq-server)",
        allow_module_level=True,
    )

Start = Callable[..., Worker]
# The results and the ledger in a database of their own: the session's workers on Redis sweep
# the ledger of theirs, and would publish this module's parked downloads to their own broker.
RESULTS_DB = 3


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RabbitServer]:
    server = RabbitServer(tmp_path_factory.mktemp("rabbitmq"))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def rclient(rabbit: RabbitServer, redis_server: RedisServer) -> Celery:
    """A producer declaring what the workers declare (download_client.brokers), results in Redis."""
    backend = f"{redis_server.url}/{RESULTS_DB}"
    settings = Settings.from_env(
        {"CELERY_BROKER_URL": rabbit.url, "CELERY_RESULT_BACKEND": backend}
    )
    app = Celery(broker=rabbit.url, backend=backend)
    app.conf.update(accept_content=["json"], **rabbitmq_config(settings))
    # The default queue exists, as it does once anything is submitted without a queue: every
    # worker binds it to the delayed-delivery exchange, whatever queues it consumes.
    with app.connection_for_write() as conn:
        Queue("celery", Exchange("celery", "topic"), "celery", **_quorum()).declare(
            channel=conn.default_channel
        )
    return app


def _quorum() -> dict[str, dict[str, str]]:
    return {"queue_arguments": {"x-queue-type": "quorum"}}


@pytest.fixture(scope="module")
def start(
    rabbit: RabbitServer, redis_server: RedisServer, rclient: Celery, tmp_path_factory
) -> Iterator[Start]:
    """Start a worker on RabbitMQ; `queue` and `download_dir` let a second worker take over."""
    started: list[Worker] = []

    def begin(
        queue: str, download_dir: Path | None = None, children: int = 2, **env: str
    ) -> Worker:
        name = f"r{len(started)}-{queue}"
        ddir = download_dir or tmp_path_factory.mktemp(f"dl-{queue}")
        results = f"{redis_server.url}/{RESULTS_DB}"
        settings = worker_env(redis_server.url, ddir, CELERY_BROKER_URL=rabbit.url,
                              CELERY_RESULT_BACKEND=results, **env)  # fmt: skip
        log = tmp_path_factory.mktemp("rlogs") / f"{name}.log"
        w = Worker(settings, name, queue, log, ddir, ["-c", str(children)])
        started.append(w)
        return w.start(rclient)

    yield begin
    for w in started:  # all warm shutdowns at once, then wait for each
        if w.proc is not None and w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def rworker(start: Start) -> Worker:
    return start("shared")


def _clean_start(w: Worker) -> None:
    log = w.log()
    assert "Failed to setup delayed delivery" not in log, log
    assert "Direct exchanges are not supported" not in log, log
    assert "Global QoS is disabled" in log  # quorum queues detected: per-consumer prefetch


def test_the_download_queue_is_a_quorum_queue_on_a_topic_exchange(rabbit, rclient, rworker):
    _clean_start(rworker)
    listed = rabbit.ctl("list_queues", "name", "type", "-q", "--formatter", "json")
    types = {q["name"]: q["type"] for q in json.loads(listed)}
    assert types["shared"] == types["shared.woken"] == types["shared.urgent"] == "quorum"
    assert types["celery"] == "quorum"
    assert types["celery_delayed_0"] == types["celery_delayed_27"] == "quorum"


def test_a_countdown_waits_in_the_broker_while_the_only_child_works(rclient, start, origin, key):
    """A 503 with Retry-After: 2 is retried 2 s later; meanwhile the worker's single child runs
    another download. A worker holding the countdown message would have no slot for it."""
    w = start("single", children=1, DOWNLOAD_RETRY_BACKOFF_MAX="10")
    _clean_start(w)
    url = f"{origin.url}/bytes/100?flaky=1&fail=503&retry_after=2&key={key}"
    waiting = submit(rclient, w, url=url, dest="later.bin")
    wait_for(lambda: origin.stats.for_key(key), 30, "the first request")
    quick = run(rclient, w, url=f"{origin.url}/bytes/100?key={key}q", dest="quick.bin")
    assert quick["size"] == 100 and len(origin.stats.for_key(key)) == 1
    assert waiting.get(timeout=30)["attempts"] == 2
    first, second = origin.stats.for_key(key)
    assert 1.9 <= second.at - first.at < 5


def test_every_retry_goes_through_the_delay_queues_as_quick_as_the_first(
    rclient, start, origin, key, dest
):
    """Three 503s with Retry-After: 3 (a delay that passes two of the delay queues), then the
    body. A retry sent again with the dead-lettering headers of the one before would count as a
    dead-letter cycle and be held by RabbitMQ for minutes."""
    w = start("patient", DOWNLOAD_RETRY_BACKOFF_MAX="10")
    url = f"{origin.url}/bytes/100?flaky=3&fail=503&retry_after=3&key={key}"
    assert run(rclient, w, url=url, dest=dest, timeout=90)["attempts"] == 4
    seen = [hit.at for hit in origin.stats.for_key(key)]
    assert len(seen) == 4
    assert all(2.9 <= later - sooner < 30 for sooner, later in itertools.pairwise(seen)), seen


def test_a_flaky_server_succeeds_on_the_third_request(rclient, rworker, origin, key, dest):
    """Backoffs below a second are sent as one-second delays (delayed delivery counts whole
    seconds); the fault budget is the same."""
    result = run(rclient, rworker, url=f"{origin.url}/bytes/5000?flaky=2&key={key}", dest=dest)
    assert result["attempts"] == 3 and result["size"] == 5000
    assert len(origin.stats.for_key(key)) == 3
    state = rclient.send_task(
        "downloads.fetch",
        kwargs={"url": f"{origin.url}/bytes/10?status=500&key={key}x"},
        queue=rworker.queue,
    )
    with pytest.raises(Exception, match=r"^HTTP 500 .*, 4 attempts over "):
        state.get(timeout=30)


def test_a_child_killed_mid_download_is_redelivered_and_resumes(
    rclient, rworker, origin, key, dest
):
    url = f"{origin.url}/bytes/1500000?rate=1000000&seed={key}&key={key}"
    res = submit(rclient, rworker, url=url, dest=dest)
    wait_for(lambda: res.state == "PROGRESS" and res.info["bytes"] > 100000, 30, "progress")
    os.kill(active_pid(rclient, rworker, res.id), signal.SIGKILL)
    result = res.get(timeout=60)
    assert result["resumed_from"] > 0 and result["attempts"] == 2
    assert result["sha256"] == body_sha256(1500000, key)


def test_a_busy_destination_is_waited_for_in_the_broker(rclient, rworker, origin, key):
    """The twin of a running download waits (countdowns, no child) and shares its result; a
    download elsewhere runs on the second child meanwhile."""
    url = f"{origin.url}/bytes/600000?seed={key}&key={key}&rate=300000"
    holder = submit(rclient, rworker, url=url, dest="same.bin")
    wait_for(lambda: holder.state == "PROGRESS", 30, "the holder to run")
    twin = submit(rclient, rworker, url=url, dest="same.bin")
    elsewhere = run(rclient, rworker, url=f"{origin.url}/bytes/1000?seed=e", dest="else.bin")
    assert elsewhere["size"] == 1000 and holder.state == "PROGRESS"
    first = holder.get(timeout=30)
    shared = twin.get(timeout=30)
    assert shared["skipped"] and shared["sha256"] == first["sha256"] == body_sha256(600000, key)
    assert len(origin.stats.for_key(key)) == 1


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_download_finishes_on_a_restarted_worker(rclient, start, origin, key, how):
    """SIGTERM: the grace runs out and the message is requeued at once. SIGKILL of the whole
    worker: RabbitMQ requeues the unacknowledged message as soon as the connection drops (no
    visibility timeout to wait for). Either way the next worker resumes from the partial."""
    env = {"DOWNLOAD_SHUTDOWN_GRACE": "1"}
    size = 2_000_000
    url = f"{origin.url}/bytes/{size}?seed={key}&key={key}&rate=500000"
    w = start(f"deploy-{how.lower()}", **env)
    res = submit(rclient, w, url=url, dest="slow.bin")
    wait_for(lambda: res.state == "PROGRESS" and res.info["bytes"] > 200_000, 30, "progress")
    if how == "SIGKILL":
        os.killpg(w.proc.pid, signal.SIGKILL)
    w.stop(signal.SIGTERM, timeout=30)
    again = start(w.queue, download_dir=w.download_dir, **env)
    result = res.get(timeout=60)
    assert result["resumed_from"] > 0 and result["sha256"] == body_sha256(size, key)
    assert result["worker"] == again.hostname
    assert len(origin.stats.for_key(key)) == 2


def test_a_broker_restart_mid_download_loses_nothing(rabbit, rclient, rworker, origin, key):
    """RabbitMQ is killed while one download runs and another waits in the queue, and comes back
    5 s later: both end SUCCESS; the queued one survived in the quorum queue's log."""
    size = 1_000_000
    running_url = f"{origin.url}/bytes/{size}?seed={key}&key={key}&rate=100000"
    running = submit(rclient, rworker, url=running_url, dest="running.bin")
    wait_for(lambda: running.state == "PROGRESS", 30, "the download to run")
    blocker = submit(rclient, rworker, url=f"{origin.url}/bytes/300000?rate=100000", dest="b")
    wait_for(lambda: blocker.state == "PROGRESS", 30, "both children busy")
    queued = submit(rclient, rworker, url=f"{origin.url}/bytes/2000?key={key}q", dest="q.bin")
    rabbit.kill()
    time.sleep(5)  # the outage itself, not a synchronisation
    rabbit.start()
    got = running.get(timeout=60)
    assert got["sha256"] == body_sha256(size, key) and running.state == "SUCCESS"
    assert queued.get(timeout=60)["size"] == 2000
    assert blocker.get(timeout=60)["size"] == 300000
    assert (rworker.download_dir / "running.bin").stat().st_size == size
    bodies = [r for r in origin.stats.for_key(key) if "If-None-Match" not in r.headers]
    assert len(bodies) == 1, "transferred twice"  # a redelivered copy may only ask for a 304


def test_status_reports_the_rabbitmq_queue_depth(rabbit, redis_server, rworker, tmp_path):
    env = worker_env(redis_server.url, tmp_path, CELERY_BROKER_URL=rabbit.url,
                     CELERY_RESULT_BACKEND=f"{redis_server.url}/{RESULTS_DB}")  # fmt: skip
    done = cli(env, "status", "--json", "--queue", rworker.queue, timeout=60)
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert status["queue_depth"] == 0 and rworker.hostname in status["workers"]


@pytest.mark.skipif(
    "DEADLINE_CROWD" not in os.environ,
    reason="a hand run (DEADLINE_CROWD=300 or 5000): minutes of parking and a restart",
)
@pytest.mark.timeout(600)  # generous waits: a loaded machine parks slowly
def test_a_crowd_waiting_a_day_on_a_dead_origin_holds_no_slot_and_no_worker_memory(
    rabbit, rclient, start, redis_server, origin, key
):
    """tests/test_deadlines_e2e.py's crowd on RabbitMQ, 300 strong (DEADLINE_CROWD=5000 by hand):
    parked in the result backend's Redis, none in the worker's queue or unacknowledged by it,
    every slot free for ordinary downloads, the worker's memory flat, all still waiting after a
    restart."""
    n, slots = int(os.environ.get("DEADLINE_CROWD", "300")), 4
    w = start("crowd", children=slots, **crowd.SETTINGS)
    backend = redis.Redis(port=redis_server.port, db=RESULTS_DB)
    ids: list[str] = []

    def all_parked() -> bool:
        listed = rabbit.ctl("list_queues", "name", "messages", "-q", "--formatter", "json")
        lanes = (w.queue, woken_lane(w.queue))
        held = sum(q["messages"] for q in json.loads(listed) if q["name"] in lanes)
        parked = crowd.parked(backend, ids) == len(ids) and not held
        return parked and crowd.states(backend, ids) == {"RETRY": len(ids)}

    try:
        crowd.every_slot_busy(rclient, w, origin, slots, f"{key}-warm")
        ids += crowd.submit_crowd(rclient, w, n // 5, f"{key}-a")
        wait_for(all_parked, 60 + n / 20, f"the first {len(ids)} parked, none in the queue")
        first = crowd.memory(w)
        ids += crowd.submit_crowd(rclient, w, n - len(ids), f"{key}-b")
        wait_for(all_parked, 180 + n / 10, f"all {n} parked, none in the queue")
        assert crowd.every_slot_busy(rclient, w, origin, slots, key) == slots
        then = crowd.memory(w)
        print(f"\nthe worker with {n // 5} parked: {first}; with {n}: {then}")
        assert w.stop(signal.SIGTERM) == 0
        w.start(rclient)
        wait_for(all_parked, 120 + n / 10, f"all {n} parked after the restart")  # none lost
        crowd.assert_flat(first, then)
    finally:
        w.stop()
        crowd.unpark(backend, ids)  # the session's other workers sweep the same due set
        backend.close()


def test_an_attempt_due_after_a_wait_goes_ahead_of_the_downloads_queued_meanwhile(
    rclient, start, origin, key
):
    """tests/test_deadlines_e2e.py's backlog on RabbitMQ: the woken lane is a quorum queue of its
    own, which the worker consumes beside the queue."""
    due_ahead_of_a_backlog(rclient, start("ahead", children=1, **AHEAD), origin, key)


def test_a_callback_after_a_retry_through_the_delay_queues_reaches_its_receiver(
    rclient, start, origin, key
):
    """A retry's countdown goes through native delayed delivery, whose routing key carries the
    delay's digits in front of the queue's name: the callback of the run that follows still
    goes to the queue the workers consume, and is POSTed."""
    from tests.receiver import Receiver

    secret = "whsec-rabbit-3f2a"
    w = start("hooked", DOWNLOAD_CALLBACK_SECRET=secret, DOWNLOAD_CALLBACK_ALLOW="127.0.0.1",
              DOWNLOAD_RETRY_BACKOFF="1", DOWNLOAD_RETRY_BACKOFF_MAX="1")  # fmt: skip
    receiver = Receiver(secret).start()
    try:
        url = f"{origin.url}/bytes/3000?seed={key}&key={key}&flaky=1"
        res = submit(rclient, w, url=url, dest=f"{key}.bin", callback_url=receiver.url)
        assert res.get(timeout=60)["attempts"] == 2
        [got] = wait_for(lambda: receiver.book.accepted(res.id), 30, "the callback")
        assert got.body["state"] == "SUCCESS"
    finally:
        receiver.stop()


def test_a_retry_through_the_delay_queues_parked_for_its_origin_is_woken_into_a_consumed_queue(
    rclient, start, origin, key
):
    """A download's retry comes back through native delayed delivery (its routing key prefixed
    with the delay's digits), finds its origin's one slot held, and parks: woken, it is
    published to its queue's woken lane, not to a queue named after that routing key."""
    w = start("parked", DOWNLOAD_HOST_CONCURRENCY="1", DOWNLOAD_RETRY_BACKOFF="1",
              DOWNLOAD_RETRY_BACKOFF_MAX="1")  # fmt: skip
    flaky = submit(rclient, w, url=f"{origin.url}/bytes/3000?seed={key}&key={key}&flaky=1",
                   dest=f"{key}.bin")  # fmt: skip
    wait_for(lambda: origin.stats.for_key(key), 30, "the first attempt")
    slow = f"{origin.url}/bytes/60000?rate=20000&key={key}-slow"
    holder = submit(rclient, w, url=slow, dest=f"{key}-slow.bin")
    result = flaky.get(timeout=60)
    assert result["attempts"] == 2 and result["waited_s"] > 0  # it did wait for the slot
    assert result["sha256"] == body_sha256(3000, key)
    assert holder.get(timeout=60)["size"] == 60000


def test_an_urgent_download_starts_ahead_of_a_backlog_queued_before_it(rclient, start, origin, key):
    """tests/test_lanes_e2e.py's backlog on RabbitMQ: the express lane is a quorum queue with a
    consumer of its own."""
    # Not "urgent": native delayed delivery binds each queue by `#.<name>`, so a queue named
    # after a lane would also take the other queues' countdowns from that lane.
    w = start("express", children=SLOTS)

    def purge() -> None:
        with rclient.connection_for_write() as conn:
            conn.default_channel.queue_purge(w.queue)

    urgent_ahead_of_a_backlog(rclient, w, origin, key, purge)


def test_an_urgent_download_parked_for_its_origin_is_the_next_it_serves(
    rclient, start, origin, key
):
    w = start("urgent-parked", DOWNLOAD_HOST_CONCURRENCY="1")
    urgent_ahead_at_its_origin(rclient, w, origin, key)


def test_an_urgent_downloads_retry_comes_back_through_the_delay_queues(
    rclient, rworker, origin, key
):
    """The lanes are bound to native delayed delivery as the queue is: a countdown from the
    express lane reaches it again."""
    from download_client.client import submit as submit_urgent

    url = f"{origin.url}/bytes/2000?seed={key}&key={key}&flaky=1"
    res = submit_urgent(rclient, url, dest=f"{key}.bin", queue=rworker.queue, urgent=True)
    result = res.get(timeout=60)
    assert result["attempts"] == 2 and result["sha256"] == body_sha256(2000, key), result


def _purge(rclient: Celery, queue: str) -> None:
    with rclient.connection_for_write() as conn:
        conn.default_channel.queue_purge(queue)


def test_a_group_submitted_behind_another_groups_backlog_takes_turns_with_it(
    rclient, start, origin, key
):
    """tests/test_groups_e2e.py's backlog on RabbitMQ: each group queue is a quorum queue with a
    consumer of its own (and its own prefetch)."""
    w = start("grouped", children=SLOTS)
    between = a_group_behind_a_backlog(rclient, w, origin, key,
                                       lambda q: _purge(rclient, q))  # fmt: skip
    assert between <= INTERLEAVED_BOUND, f"{between} of A's started before B's last"


def test_a_group_parked_behind_another_groups_backlog_at_a_busy_origin_takes_turns(
    rclient, start, origin, key, redis_server
):
    cap = {"DOWNLOAD_HOST_CONCURRENCY": "8"}
    workers = [start("grouped-parked", children=16, **cap) for _ in range(3)]
    ledger = redis.Redis(port=redis_server.port, db=RESULTS_DB)

    def purge(group: str) -> None:
        _purge(rclient, group_queue(workers[0].queue, group))
        forget_parked(ledger, group)

    try:
        between = a_group_behind_a_parked_backlog(rclient, workers, origin, key, purge)
    finally:
        ledger.close()
    assert between <= INTERLEAVED_BOUND, f"{between} of A's arrived before B's last"


def test_a_retry_of_a_group_added_while_the_worker_ran_comes_back_through_the_delay_queues(
    rclient, rworker, origin, key
):
    """A group queue the worker began to consume after it started (the client's announcement)
    is bound to native delayed delivery as its queue is: a countdown reaches it again."""
    from download_client.client import submit as submit_grouped

    url = f"{origin.url}/bytes/2000?seed={key}&key={key}&flaky=1"
    group = f"late-{key[:8]}"
    res = submit_grouped(rclient, url, dest=f"{key}.bin", queue=rworker.queue, group=group)
    result = res.get(timeout=60)
    assert result["attempts"] == 2 and result["sha256"] == body_sha256(2000, key), result
    assert "not bound for native delayed delivery" not in rworker.log()
