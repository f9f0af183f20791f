"""Flower against the real stack: REST submission, polling, revoking, live progress, redaction,
metrics and queue length (a real `celery -A worker flower` with basic auth, real workers)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.result import AsyncResult

from download_client.client import connect, submit
from download_client.settings import Settings
from tests.harness import ROOT, TASK, wait_for, worker_env
from tests.server import body_sha256

SECRET_HEADER = "Bearer hdr-" + uuid.uuid4().hex
SECRET_TOKEN = "tok-" + uuid.uuid4().hex


def fetch_body(url: str, **kwargs: object) -> dict[str, object]:
    return {"kwargs": {"url": url, **kwargs}}


def test_api_needs_credentials(flower):
    for path in ("/api/workers", "/api/tasks", "/api/queues/length", "/api/task/info/x"):
        assert flower.get(path, auth=None).status_code == 401, path
        assert flower.get(path, auth=("ops", "wrong")).status_code == 401, path
    for path in (
        f"/api/task/async-apply/{TASK}",
        f"/api/task/send-task/{TASK}",
        "/api/task/revoke/x",
    ):
        assert flower.post(path, fetch_body("http://x/"), auth=None).status_code == 401, path
    # Open by Flower's design, for scrapers and probes: documented in docs/metrics.md.
    assert flower.get("/metrics", auth=None).status_code == 200
    assert flower.get("/healthcheck", auth=None).status_code == 200


def test_rest_submit_poll_and_listing(flower, worker, origin):
    ids = []
    for endpoint in ("async-apply", "send-task"):
        url = f"{origin.url}/bytes/50000?seed={endpoint}"
        r = flower.post(
            f"/api/task/{endpoint}/{TASK}", fetch_body(url, dest=f"rest/{endpoint}.bin")
        )
        assert r.status_code == 200, r.text
        tid = r.json()["task-id"]
        ids.append(tid)
        done = flower.wait_result(tid)
        assert done["state"] == "SUCCESS", done
        assert done["result"]["path"] == f"rest/{endpoint}.bin"
        assert done["result"]["sha256"] == body_sha256(50000, endpoint)
        assert (worker.download_dir / f"rest/{endpoint}.bin").stat().st_size == 50000
        info = flower.wait_state(tid, "SUCCESS")
        assert info["name"] == TASK
        assert info["worker"] == worker.hostname
        assert info["sent"] is not None  # Flower, the producer here, sent task-sent
    workers = flower.get("/api/workers", refresh=1).json()
    assert worker.hostname in workers
    listed = flower.get("/api/tasks", taskname=TASK).json()
    assert set(ids) <= set(listed)


def test_flower_shows_the_failures_short_message_as_its_exception(flower, worker, origin):
    url = f"{origin.url}/bytes/10?status=500&key={uuid.uuid4().hex}"
    r = flower.post(f"/api/task/send-task/{TASK}", fetch_body(url, dest="fails/500.bin"))
    info = flower.wait_state(r.json()["task-id"], "FAILURE")
    host = origin.url.removeprefix("http://")
    said = rf"HTTP 500 Internal Server Error from {host}, 4 attempts over .+"
    assert re.fullmatch(said, info["exception"]), info["exception"]


def test_rest_revoke_queued_and_running_and_queue_length(flower, start_worker, origin):
    queue = f"revoke-{uuid.uuid4().hex[:6]}"
    start_worker(queue=queue, concurrency=1)
    slow = flower.post(
        f"/api/task/send-task/{TASK}",
        {**fetch_body(f"{origin.url}/bytes/5000000?rate=50000&seed=slow"), "queue": queue},
    ).json()["task-id"]
    flower.wait_state(slow, "PROGRESS")
    queued = [
        flower.post(
            f"/api/task/send-task/{TASK}",
            {**fetch_body(f"{origin.url}/bytes/1000?seed=q{i}"), "queue": queue},
        ).json()["task-id"]
        for i in range(3)
    ]
    # The worker runs one and holds no other (prefetch 1, late acks): three wait in Redis.
    wait_for(lambda: flower.queue_lengths().get(queue) == 3, 30, "queue length 3 in Flower")

    assert flower.post(f"/api/task/revoke/{queued[0]}").status_code == 200
    r = flower.post(f"/api/task/revoke/{slow}?terminate=true")
    assert r.status_code == 200, r.text

    assert flower.wait_result(slow)["state"] == "REVOKED"
    flower.wait_state(slow, "REVOKED")
    assert flower.wait_result(queued[0])["state"] == "REVOKED"
    assert [flower.wait_result(t)["state"] for t in queued[1:]] == ["SUCCESS", "SUCCESS"]
    wait_for(lambda: flower.queue_lengths().get(queue) == 0, 30, "the queue to drain")


def test_progress_line_for_people():
    from tasks.progress import progress_text

    assert progress_text(1_258_292, 5_033_165) == "1.2 MiB of 4.8 MiB (25%)"
    assert progress_text(999, 1000) == "999 B of 1000 B (99%)"  # 100% only once all is there
    assert progress_text(1000, 1000) == "1000 B of 1000 B (100%)"
    assert progress_text(3 * 2**30, 2**40) == "3.0 GiB of 1.0 TiB (0%)"
    assert progress_text(1_258_291, None) == "1.2 MiB (size unknown)"


def test_progress_reaches_pollers_and_flower(flower, worker, origin, client, event_log):
    size = 1_000_000
    res = client.send_task(TASK, kwargs={"url": f"{origin.url}/bytes/{size}?rate=400000"})

    def backend_progress() -> dict[str, int] | None:
        return res.info if res.state == "PROGRESS" and res.info.get("bytes") else None

    progress = wait_for(backend_progress, 30, "PROGRESS in the result backend")
    assert 0 < progress["bytes"] <= size
    assert progress["total"] == size
    info = flower.wait_state(res.id, "PROGRESS", timeout=30)
    # On Flower's task list, task page and API: JSON text that leads with a line for people,
    # "312.5 KiB of 976.6 KiB (32%)", and keeps the figures.
    shown = json.loads(info["result"])
    assert list(shown) == ["progress", "bytes", "total"]
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB) of 976\.6 KiB \(\d{1,2}%\)", shown["progress"])
    assert shown["total"] == size and 0 < shown["bytes"] <= size
    assert res.get(timeout=60)["size"] == size
    assert flower.wait_state(res.id, "SUCCESS")["result"].startswith("{'url'")
    # For machines, the same figures as numbers in every task-progress event.
    events = [e for e in event_log if e["type"] == "task-progress" and e["uuid"] == res.id]
    assert events and all(e["total"] == size and 0 < e["bytes"] <= size for e in events)
    assert [e["bytes"] for e in events] == sorted(e["bytes"] for e in events)


def test_progress_is_throttled(flower, start_worker, origin, client):
    interval, chunk, size = 0.25, 4096, 3_000_000
    w = start_worker(DOWNLOAD_PROGRESS_INTERVAL=str(interval), DOWNLOAD_CHUNK_SIZE=str(chunk))
    result = client.send_task(
        TASK, kwargs={"url": f"{origin.url}/bytes/{size}?rate=3000000"}, queue=w.queue
    ).get(timeout=60)
    labels = {"worker": w.hostname, "task": TASK}
    wait_for(
        lambda: flower.metric("flower_events_total", type="task-succeeded", **labels) == 1,
        30,
        "flower to count the success",
    )
    sent = flower.metric("flower_events_total", type="task-progress", **labels) or 0
    chunks = size // chunk  # what an unthrottled report per chunk would send
    assert sent <= result["elapsed_s"] / interval + 1
    assert sent < chunks / 20


@pytest.fixture
def event_log(client) -> Iterator[list[dict[str, Any]]]:
    """Every event on the bus while the test runs (what any monitor, not only Flower, gets)."""
    events: list[dict[str, Any]] = []
    with client.connection() as conn:
        receiver = client.events.Receiver(conn, handlers={"*": events.append})
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        probe = f"probe-{uuid.uuid4().hex}"

        def captured() -> bool:
            with client.events.default_dispatcher() as dispatcher:
                dispatcher.send("test-probe", probe=probe)
            return any(e.get("probe") == probe for e in list(events))

        wait_for(captured, 30, "the event receiver to subscribe")
        yield events
        receiver.should_stop = True
        thread.join(10)


def test_secrets_never_shown(flower, worker, origin, client, redis_server, tmp_path, event_log):
    headers = {"Authorization": SECRET_HEADER}
    url = f"{origin.url}/bytes/20000?token={SECRET_TOKEN}"
    parked = f"parked-{uuid.uuid4().hex[:6]}"  # nobody consumes it: only task-sent is seen
    env = worker_env(redis_server.url, tmp_path)
    ours = connect(Settings.from_env(env))

    def rest(endpoint: str, **options: str) -> str:
        body = {**fetch_body(url, headers=headers), **options}
        return str(flower.post(f"/api/task/{endpoint}/{TASK}", body).json()["task-id"])

    run = [
        rest("async-apply"),
        rest("send-task"),
        submit(ours, url, headers=headers).id,
        client.send_task(TASK, kwargs={"url": url, "headers": headers}).id,  # a foreign client
        # Its retry is published by the worker, with a task-sent event of its own.
        client.send_task(
            TASK, kwargs={"url": f"{url}&flaky=1&key={uuid.uuid4().hex}", "headers": headers}
        ).id,
    ]
    header = f"Authorization: {SECRET_HEADER}"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "download_client.cli",
            "submit",
            url,
            "--header",
            header,
            "--queue",
            parked,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 0, cli.stderr
    waiting = [
        rest("send-task", queue=parked),
        rest("async-apply", queue=parked),
        submit(ours, url, headers=headers, queue=parked).id,
        cli.stdout.split()[0],  # "<id>  <url>"
    ]
    slow_url = f"{origin.url}/bytes/1000000?rate=500000&token={SECRET_TOKEN}"
    slow = client.send_task(TASK, kwargs={"url": slow_url, "headers": headers})
    flower.wait_state(slow.id, "PROGRESS")
    # Flower 2.2 lists a worker's active tasks (inspect active) only when asked for that worker.
    workers = flower.get("/api/workers", refresh=1, workername=worker.hostname).json()
    active = workers[worker.hostname]["active"]
    shown = {"url": slow_url.replace(SECRET_TOKEN, "***"), "headers": {"Authorization": "***"}}
    assert [t["kwargs"] for t in active if t["id"] == slow.id] == [repr(shown)]
    seen = [json.dumps(workers)]
    for tid in run:
        AsyncResult(tid, app=client).get(timeout=60)
        flower.wait_state(tid, "SUCCESS")
    for tid in waiting:  # what Flower shows of a task waiting in the queue: the producer's event
        info = flower.wait_state(tid, "PENDING")
        assert info["sent"] is not None  # task-sent from Flower, our client and our CLI
        assert "token=***" in info["kwargs"], info["kwargs"]
        assert "'Authorization': '***'" in info["kwargs"], info["kwargs"]
    slow.get(timeout=60)
    flower.wait_state(slow.id, "SUCCESS")
    for tid in [*run, *waiting, slow.id]:
        seen.append(flower.get(f"/api/task/info/{tid}").text)
        seen.append(flower.get(f"/api/task/result/{tid}").text)
        seen.append(flower.get(f"/task/{tid}").text)  # the HTML page
    for path in ("/api/tasks", "/api/queues/length", "/tasks", "/workers", "/dashboard"):
        seen.append(flower.get(path).text)
    seen += [flower.get("/metrics").text, cli.stdout, cli.stderr, flower.log(), worker.log()]
    retried = [e for e in event_log if e["type"] == "task-retried" and e["uuid"] == run[-1]]
    assert retried, "the flaky download was not retried"
    sent = [e for e in event_log if e["type"] == "task-sent" and e.get("name") == TASK]
    assert {e["uuid"] for e in sent} >= {run[0], run[1], run[2], run[4], *waiting}  # 4: retry
    seen.append(json.dumps(event_log, default=str))
    everything = "\n".join(seen)
    assert "***" in everything
    assert SECRET_HEADER.split()[1] not in everything
    assert SECRET_TOKEN not in everything


def test_metrics_flower_and_ours(flower, start_worker, origin, client):
    # A child per download, each replaced after its one task (a replacement takes seconds to
    # come up: three children, so no download waits for one).
    w = start_worker(concurrency=3, WORKER_MAX_TASKS_PER_CHILD="1")
    sizes = (10_000, 30_000)
    good = [
        client.send_task(TASK, kwargs={"url": f"{origin.url}/bytes/{n}"}, queue=w.queue)
        for n in sizes
    ]
    bad = client.send_task(TASK, kwargs={"url": f"{origin.url}/nothing-here"}, queue=w.queue)
    assert [r.get(timeout=60)["size"] for r in good] == list(sizes)
    assert bad.get(timeout=60, propagate=False) is not None and bad.state == "FAILURE"

    labels = {"worker": w.hostname}
    fetch = {**labels, "task": TASK}

    def settled() -> bool:
        return (
            flower.metric("downloads_bytes_total", **labels) == sum(sizes)
            and flower.metric("downloads_worker_children_recycled_total", **labels) == 3
            and flower.metric("flower_events_total", type="task-succeeded", **fetch) == 2
            and flower.metric("flower_events_total", type="task-failed", **fetch) == 1
        )

    wait_for(settled, 30, "the metrics to count 2 successes, 1 failure, 3 recycled children")
    assert flower.metric("flower_task_runtime_seconds_count", **fetch) == 2
    assert flower.metric("flower_worker_online", **labels) == 1


def test_two_hosts_one_queue(start_worker, origin, client):
    queue = f"shared-{uuid.uuid4().hex[:6]}"
    a = start_worker(queue=queue)
    b = start_worker(queue=queue)
    # Each holds at most 2 (2 children, prefetch 1, late acks): 8 half-second downloads must
    # be shared out.
    results = [
        client.send_task(
            TASK,
            kwargs={"url": f"{origin.url}/bytes/100000?rate=200000&seed=h{i}", "dest": f"h/{i}"},
            queue=queue,
        )
        for i in range(8)
    ]
    done = [r.get(timeout=60) for r in results]
    dirs = {a.hostname: Path(a.download_dir), b.hostname: Path(b.download_dir)}
    assert {d["worker"] for d in done} == set(dirs)
    for d in done:  # per-host directories: `worker` in the result says where the file is
        assert (dirs[d["worker"]] / d["path"]).stat().st_size == 100000


def test_readme_curl_examples_work(flower, worker, origin):
    """The Flower page's curl block, command by command, against the real Flower."""
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    page = (ROOT / "docs" / "flower.md").read_text()
    section = page.split("## Submitting over HTTP (Flower's REST API)")[1].split("\n## ")[0]
    block = section.split("```sh\n")[1].split("```")[0]
    commands = [
        c.strip()
        for c in re.sub(r"\\\n\s*", "", block).splitlines()
        if c.startswith("curl ")  # comments and the FLOWER=, AUTH=, ID= placeholders left out
    ]
    assert [c.split('"$FLOWER')[1].split("/$ID")[0].split('"')[0] for c in commands] == [
        f"/api/task/send-task/{TASK}",
        "/api/task/result",
        "/api/task/info",
        "/api/task/revoke",
    ]
    slow = f"{origin.url}/bytes/5000000?rate=100000&seed=readme"
    # The worker is shared: other tests run the README's own example into img/a.png.
    dest = f"img/{uuid.uuid4().hex[:8]}.png"
    env = {"PATH": os.environ["PATH"], "FLOWER": flower.url, "AUTH": ":".join(flower.auth)}

    def sh(command: str) -> Any:
        done = subprocess.run(
            [
                "bash",
                "-c",
                command.replace("https://example.com/a.png", slow).replace("img/a.png", dest),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    assert '"dest": "img/a.png"' in commands[0]
    env["ID"] = sh(commands[0])["task-id"]
    flower.wait_state(env["ID"], "PROGRESS")
    assert sh(commands[1])["state"] == "PROGRESS"
    assert " of 4.8 MiB (" in sh(commands[2])["result"]
    assert "message" in sh(commands[3])
    assert flower.wait_result(env["ID"])["state"] == "REVOKED"
    assert not (worker.download_dir / dest).exists()
