"""The `downloads` command and the Python client, for real: `python -m download_client.cli` in a
subprocess against the test Redis, real workers and the loopback origin; batches of 50 with
failures mixed in; exit codes; input files; cancel and wait by id; retries explained. The live
view in a terminal: tests/test_cli_pty.py."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

from download_client import records
from download_client.client import BatchProgress, connect, submit_many, wait
from download_client.settings import Settings
from tests.harness import ROOT, TASK, cli, free_port, wait_for, worker_env
from tests.server import body, body_sha256


@pytest.fixture
def env(redis_server, tmp_path) -> dict[str, str]:
    return worker_env(redis_server.url, tmp_path)


def gallery(origin: Any, good: int, bad: int) -> tuple[list[str], list[str]]:
    tag = uuid.uuid4().hex[:6]
    ok = [f"{origin.url}/bytes/{2000 + i}?seed={tag}{i}" for i in range(good)]
    missing = [f"{origin.url}/missing/{tag}-{i}.png" for i in range(bad)]
    return ok, missing


def test_submit_50_and_wait_json(env, worker, origin, flower):
    ok, missing = gallery(origin, 45, 5)
    urls = ok[:20] + missing + ok[20:]
    done = cli(env, "submit", *urls, "--wait", "--json")
    assert done.returncode == 1, done.stderr  # some failed
    rows = json.loads(done.stdout)
    assert len(rows) == 50 and len({r["id"] for r in rows}) == 50  # one id per download
    assert [r["url"] for r in rows] == urls
    by_state = {r["url"]: r for r in rows}
    for url in ok:
        assert by_state[url]["state"] == "SUCCESS"
        assert by_state[url]["result"]["size"] == int(url.split("/bytes/")[1].split("?")[0])
    for url in missing:
        assert by_state[url]["state"] == "FAILURE"
        assert "404" in by_state[url]["error"]
    # Flower saw every one, from the CLI's task-sent to the worker's final event.
    for row in rows:
        info = flower.wait_state(row["id"], row["state"])
        assert info["sent"] is not None
        assert info["worker"] == worker.hostname


def test_submit_wait_table_lists_successes_and_failures(env, worker, origin):
    ok, missing = gallery(origin, 8, 2)
    done = cli(env, "submit", *ok, *missing, "--wait")
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["STATE", "SIZE", "PATH", "/", "ERROR", "ID", "URL"]
    rows = [line.split() for line in lines if line.startswith(("SUCCESS", "FAILURE"))]
    assert len({r[-2] for r in rows}) == 10  # each download's own id, beside its URL
    assert all(_is_id(r[-2]) for r in rows)
    assert sum(r[0] == "SUCCESS" for r in rows) == 8
    assert sum(line.startswith("FAILURE") and "404" in line for line in lines) == 2
    assert "Error(" not in done.stdout and "{" not in done.stdout  # the message, as written
    assert lines[-1].startswith("8 of 10 succeeded")


def _is_id(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def test_submit_without_wait_prints_one_id_per_url(env, flower, origin):
    parked = f"parked-{uuid.uuid4().hex[:6]}"
    urls = [f"{origin.url}/bytes/10?n={i}" for i in range(3)]
    done = cli(env, "submit", *urls, "--queue", parked, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["url"] for r in rows] == urls and len({r["id"] for r in rows}) == 3
    for row in rows:  # task-sent comes from the CLI itself: no worker consumes this queue
        assert flower.wait_state(row["id"], "PENDING")["sent"] is not None
    plain = cli(env, "submit", urls[0], "--queue", parked)
    assert plain.returncode == 0 and plain.stdout.split()[1] == urls[0]


def test_python_client_batch_of_50(env, worker, origin):
    app = connect(Settings.from_env(env))
    ok, missing = gallery(origin, 45, 5)
    results = submit_many(app, [*missing, *ok[:-1], {"url": ok[-1], "dest": "batch/last.bin"}])
    assert len({r.id for r in results}) == 50
    batch = BatchProgress(results)
    done = wait(results, timeout=120, on_update=batch.update)
    assert set(done) == {r.id for r in results}
    summary = batch.summary()
    assert summary["succeeded"] == 45 and summary["failed"] == 5, summary
    assert summary["running"] == summary["waiting"] == 0
    assert summary["bytes"] == sum(int(u.split("/bytes/")[1].split("?")[0]) for u in ok)
    assert (worker.download_dir / "batch/last.bin").exists()
    assert sorted(r.state for r in done.values()).count("FAILURE") == 5


def test_status_shows_workers_queue_depth_and_active(env, start_worker, origin, client):
    queue = f"status-{uuid.uuid4().hex[:6]}"
    w = start_worker(queue=queue, concurrency=1)
    slow_url = f"{origin.url}/bytes/4000000?rate=200000&token=sekrit-{uuid.uuid4().hex}"
    slow = client.send_task(TASK, kwargs={"url": slow_url}, queue=queue)
    wait_for(lambda: slow.state == "PROGRESS", 30, "the slow download to run")
    for i in range(2):
        client.send_task(TASK, kwargs={"url": f"{origin.url}/bytes/10?s={i}"}, queue=queue)

    def status() -> dict[str, Any] | None:
        done = cli(env, "status", "--queue", queue, "--json")
        assert done.returncode == 0, done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        return body if body["queue_depth"] == 2 and body["active"] else None

    body = wait_for(status, 30, "status to show 2 queued and one active")
    assert w.hostname in body["workers"]
    active = next(a for a in body["active"] if a["id"] == slow.id)
    assert active["worker"] == w.hostname
    assert active["progress"]["total"] == 4000000 and active["progress"]["bytes"] > 0
    assert "sekrit" not in json.dumps(body)
    assert active["kwargs"] == {"url": slow_url.split("token=")[0] + "token=***"}
    text = cli(env, "status", "--queue", queue)
    assert text.returncode == 0
    assert f"queue {queue!r}: 2 queued" in text.stdout
    assert body["waiting"]["queued"] == 2
    assert w.hostname in text.stdout and slow.id in text.stdout
    client.control.revoke(slow.id, terminate=True)
    wait_for(lambda: slow.state == "REVOKED", 30, "the slow download to be revoked")


def test_exit_codes(env, worker, origin, client):
    url = f"{origin.url}/bytes/10"
    assert cli(env, "submit", url, url, "--dest", "x").returncode == 2
    bad_header = cli(env, "submit", url, "--header", "no-colon-here")
    assert bad_header.returncode == 2 and "NAME:VALUE" in bad_header.stderr
    assert cli(env).returncode == 2
    for bad in (["notaurl"], [url, "--dest", "../x"], [url, "--sha256", "xyz"]):
        refused = cli(env, "submit", *bad)  # checked before anything is sent
        assert refused.returncode == 2 and refused.stderr.startswith("error: "), bad
        assert refused.stdout == ""
    bad_setting = cli({**env, "DOWNLOAD_READ_TIMEOUT": "soon"}, "status")
    assert bad_setting.returncode == 2 and "DOWNLOAD_READ_TIMEOUT='soon'" in bad_setting.stderr
    assert "Traceback" not in bad_setting.stderr

    nowhere = {**env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (("status",), ("submit", url)):
        done = cli(nowhere, *args)
        assert done.returncode == 3, (args, done.stderr)
        assert "cannot reach" in done.stderr

    slow = f"{origin.url}/bytes/1000000?rate=500000&seed={uuid.uuid4().hex}"
    timed_out = cli(env, "submit", slow, "--wait", "--timeout", "0.5", "--json")
    assert timed_out.returncode == 4, timed_out.stderr
    [row] = json.loads(timed_out.stdout)
    assert row["state"] not in ("SUCCESS", "FAILURE")
    assert "timed out after 0.5 s: 1 download not finished go on" in timed_out.stderr
    assert f"follow them with: downloads wait {row['id']}" in timed_out.stderr

    good = client.send_task(TASK, kwargs={"url": url})
    bad = client.send_task(TASK, kwargs={"url": f"{origin.url}/missing"})
    good.get(timeout=60)
    bad.get(timeout=60, propagate=False)
    assert cli(env, "result", good.id, "--json").returncode == 0
    both = cli(env, "result", good.id, bad.id, "--json")
    assert both.returncode == 1
    rows = json.loads(both.stdout)
    assert [r["state"] for r in rows] == ["SUCCESS", "FAILURE"]
    assert rows[0]["url"] == url and rows[0]["result"]["url"] == url
    assert rows[1]["url"] is None and "404" in rows[1]["error"]


def test_with_only_the_broker_set_worker_and_cli_meet_on_the_same_results(
    redis_server, start_worker, origin, tmp_path
):
    broker = redis_server.url  # redis://127.0.0.1:port, no database: 0 for the queue
    queue = f"broker-only-{uuid.uuid4().hex[:6]}"
    start_worker(queue=queue, CELERY_BROKER_URL=broker, CELERY_RESULT_BACKEND="")
    env = {**worker_env(broker, tmp_path), "CELERY_BROKER_URL": broker}
    del env["CELERY_RESULT_BACKEND"]
    url = f"{origin.url}/bytes/1234?seed=broker-only"
    done = cli(env, "submit", url, "--queue", queue, "--wait", "--timeout", "60", "--json")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["state"] == "SUCCESS" and row["result"]["size"] == 1234


def test_help_lists_the_environment_and_the_exit_codes(env):
    for args in ([], ["submit"], ["wait"], ["cancel"], ["status"], ["result"]):
        shown = cli(env, *args, "--help")
        assert shown.returncode == 0, args
        for name in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "DOWNLOAD_RESULT_EXPIRES"):
            assert name in shown.stdout, (args, name)
        codes = shown.stdout.split("exit codes:")[1]
        assert [line.split()[0] for line in codes.strip().splitlines()] == [
            "0",
            "1",
            "2",
            "3",
            "4",
            "130",
        ]
    assert "URL [DEST] [SHA256]" in cli(env, "submit", "--help").stdout


def test_wait_cancel_and_result_by_id(env, worker, origin, client):
    slow = f"{origin.url}/bytes/4000000?rate=200000&seed={uuid.uuid4().hex}"
    fast = f"{origin.url}/bytes/1234?seed={uuid.uuid4().hex}"
    queued = json.loads(cli(env, "submit", slow, fast, "--json").stdout)
    slow_id, fast_id = queued[0]["id"], queued[1]["id"]
    nobody = str(uuid.uuid4())
    # Waiting again on existing ids: the fast one ends, the slow one is still running.
    waited = cli(env, "wait", fast_id, slow_id, "--timeout", "3", "--json")
    assert waited.returncode == 4, waited.stderr
    rows = {r["id"]: r for r in json.loads(waited.stdout)}
    assert rows[fast_id]["state"] == "SUCCESS" and rows[fast_id]["url"] == fast
    assert rows[slow_id]["url"] == slow  # known from the submission, before any result
    stopped = cli(env, "cancel", slow_id, fast_id, nobody)
    assert stopped.returncode == 1, stopped.stderr  # one id is unknown
    said = dict(line.split(None, 1) for line in stopped.stdout.splitlines())
    assert said[slow_id].startswith("cancelled (was ")
    assert said[fast_id] == "already SUCCESS: nothing to cancel"
    assert said[nobody].startswith("unknown")
    wait_for(lambda: client.AsyncResult(slow_id).state == "REVOKED", 30, "the revoke")
    again = cli(env, "wait", slow_id, fast_id)
    assert again.returncode == 1
    assert "REVOKED" in again.stdout and "cancelled" in again.stdout
    # `result`: a table for people, JSON for machines; an id nothing is known about.
    third_party = client.send_task(TASK, kwargs={"url": fast}, queue=f"none-{nobody[:6]}")
    table = cli(env, "result", fast_id, slow_id, nobody, third_party.id)
    assert table.returncode == 1
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["STATE", "SIZE", "PATH", "/", "ERROR", "ID", "URL"]
    assert lines[1].split()[0] == "SUCCESS" and fast_id in lines[1] and fast in lines[1]
    assert lines[2].split()[:2] == ["REVOKED", "cancelled"] and slow in lines[2]
    assert lines[3].startswith("unknown") and lines[4].startswith("unknown")
    assert lines[3].split()[-1] == "-"  # no URL is known: a dash, never None
    assert "None" not in table.stdout
    assert "{" not in table.stdout  # no Python dict
    machine = json.loads(cli(env, "result", nobody, "--json").stdout)
    assert machine == [{"id": nobody, "url": None, "state": "unknown"}]
    assert cli(env, "wait", nobody).returncode == 1


def test_input_file_plain_and_json_lines(env, worker, origin, tmp_path):
    tag = uuid.uuid4().hex
    payload = body(5000, tag)
    good = tmp_path / "list.txt"
    good.write_text(
        "# downloads, one a line\n"
        f"{origin.url}/bytes/5000?seed={tag} in/{tag}/a.bin {hashlib.sha256(payload).hexdigest()}\n"
        "\n"
        f"{origin.url}/bytes/100?seed={tag}\tin/{tag}/b.bin\n"
        + json.dumps({"url": f"{origin.url}/bytes/7?seed={tag}", "dest": f"in/{tag}/c.bin"})
        + "\n"
    )
    done = cli(env, "submit", "-i", str(good), "--wait", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["result"]["path"] for r in rows] == [f"in/{tag}/{n}.bin" for n in "abc"]
    assert (worker.download_dir / f"in/{tag}/a.bin").read_bytes() == payload
    # Standard input, and a bad line: named by file and number; the lines before it are queued.
    bad = f"{origin.url}/bytes/1?seed={tag}x\nftp://example.invalid/f\n{origin.url}/bytes/2\n"
    refused = subprocess.run(
        [sys.executable, "-m", "download_client.cli", "submit", "-i", "-", "--json"],
        cwd=ROOT,
        env=env,
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2
    assert "standard input, line 2: url: scheme must be http or https" in refused.stderr
    assert "the 1 downloads up to line 1 were queued" in refused.stderr
    assert [r["url"] for r in json.loads(refused.stdout)] == [f"{origin.url}/bytes/1?seed={tag}x"]


DOWNLOADS = str(Path(sys.executable).parent / "downloads")  # the installed command


@pytest.mark.parametrize("flag", [[], ["--ids"]], ids=["id-and-url", "ids"])
def test_submit_piped_into_wait_waits_for_every_download(env, worker, origin, tmp_path, flag):
    tag = uuid.uuid4().hex
    urls = [f"{origin.url}/bytes/{300 + i}?seed={tag}{i}" for i in range(3)]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(u + "\n" for u in urls))
    # Two real processes with a real pipe between them, as a shell makes it.
    submit = subprocess.Popen(
        [DOWNLOADS, "submit", "-i", str(listing), *flag], env=env, stdout=subprocess.PIPE
    )
    waiting = subprocess.Popen(
        [DOWNLOADS, "wait", "-i", "-", "--json"],
        env=env,
        stdin=submit.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert submit.stdout is not None
    submit.stdout.close()  # the pipe is the waiting process's alone
    out, err = waiting.communicate(timeout=120)
    assert submit.wait(30) == 0
    assert waiting.returncode == 0, err
    rows = json.loads(out)
    assert [r["url"] for r in rows] == urls
    assert [r["state"] for r in rows] == ["SUCCESS"] * 3


def test_submit_ids_prints_the_id_alone(env, worker, origin):
    url = f"{origin.url}/bytes/64?seed={uuid.uuid4().hex}"
    shell = subprocess.run(
        [
            "bash",
            "-c",
            'ID=$("$0" submit --ids "$1") && echo "[$ID]" && "$0" wait "$ID" --json',
            DOWNLOADS,
            url,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shell.returncode == 0, shell.stderr
    first, waited = shell.stdout.split("\n", 1)
    assert re.fullmatch(r"\[[0-9a-f]{8}-(?:[0-9a-f]{4}-){3}[0-9a-f]{12}\]", first)
    rows = json.loads(waited)
    assert rows[0]["id"] == first[1:-1] and rows[0]["url"] == url
    assert rows[0]["state"] == "SUCCESS"
    for other in ("--wait", "--json"):
        refused = cli(env, "submit", "--ids", other, url)
        assert refused.returncode == 2 and "not with --wait or --json" in refused.stderr


def test_cancel_and_result_read_ids_as_submit_prints_them(env, worker, origin, tmp_path):
    parked = f"parked-{uuid.uuid4().hex[:6]}"  # no worker: they stay queued
    urls = [f"{origin.url}/bytes/10?n={i}" for i in range(2)]
    listed = cli(env, "submit", *urls, "--queue", parked)
    assert listed.returncode == 0, listed.stderr
    ids = [line.split()[0] for line in listed.stdout.splitlines()]
    saved = tmp_path / "ids"
    saved.write_text("# what submit printed\n\n" + listed.stdout)
    shown = cli(env, "result", "-i", str(saved), "--json")
    rows = json.loads(shown.stdout)
    assert [(r["id"], r["url"], r["state"]) for r in rows] == [
        (i, u, "PENDING") for i, u in zip(ids, urls, strict=True)
    ]
    with saved.open() as lines:  # standard input, as a pipe gives it
        cancelled = subprocess.run(
            [DOWNLOADS, "cancel", "-i", "-"], env=env, stdin=lines, capture_output=True, text=True
        )
    assert cancelled.returncode == 0, cancelled.stderr
    said = dict(line.split(None, 1) for line in cancelled.stdout.splitlines())
    assert said == {i: "cancelled (was PENDING)" for i in ids}
    # A line whose first field is not an id: the file and the line, exit 2, nothing done.
    bad = tmp_path / "bad"
    bad.write_text(f"{ids[0]}  {urls[0]}\n{urls[1]}\n")
    for command in ("wait", "cancel", "result"):
        refused = cli(env, command, "-i", str(bad))
        assert refused.returncode == 2, refused.stderr
        assert f"error: {bad}, line 2: '{urls[1]}' is not a download id" in refused.stderr
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).delete(parked)


# The CLI's own peak RSS (VmHWM, which starts afresh at exec), written at exit: the rusage of a
# child also counts the pages it shared with this test process between fork and exec.
_PEAK_RSS = """
import atexit, re, runpy, sys
out = sys.argv.pop(1)
def peak():
    status = open("/proc/self/status").read()
    open(out, "w").write(re.search(r"VmHWM:\\s+(\\d+)", status).group(1))
atexit.register(peak)
sys.argv[0] = "downloads"
runpy.run_module("download_client.cli", run_name="__main__", alter_sys=True)
"""


def test_200000_lines_from_a_file_in_flat_memory(env, redis_server, tmp_path):
    """No worker needed: the messages wait in a queue nobody consumes, and are counted there."""
    queue = f"bulk-{uuid.uuid4().hex[:6]}"
    broker = redis.Redis(port=redis_server.port, db=0)

    def submit_file(lines: int) -> int:
        listing = tmp_path / f"{lines}.txt"
        with listing.open("w") as f:
            for i in range(lines):
                f.write(f"http://127.0.0.1:9/files/{i}.bin bulk/{i}.bin\n")
        peak = tmp_path / f"{lines}.peak"
        argv = ["-c", _PEAK_RSS, str(peak), "submit", "-i", str(listing), "--queue", queue]
        proc = subprocess.run(
            [sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stderr
        assert broker.llen(queue) == lines
        broker.delete(queue)
        return int(peak.read_text())  # KiB

    try:
        started = time.monotonic()
        small, big = submit_file(2_000), submit_file(200_000)
        print(f"2,000 and 200,000 lines submitted in {time.monotonic() - started:.1f} s")
    finally:
        broker.delete(queue)
    assert big < 150 * 1024, f"peak RSS {big} KiB"
    assert big - small < 30 * 1024, (small, big)  # 100 times the lines, about the same memory


def test_a_retry_shows_its_reason_and_when_the_next_attempt_is_due(env, client):
    """The view of a retry, from the state a worker leaves and its note (written here as a
    worker writes it)."""
    from download_client.errors import TransientError

    url = "http://127.0.0.1:9/gone.bin"
    queued = json.loads(
        cli(env, "submit", url, "--queue", f"none-{uuid.uuid4().hex[:6]}", "--json").stdout
    )
    task_id = queued[0]["id"]
    client.backend.mark_as_retry(task_id, TransientError("connection refused by 127.0.0.1:9"))
    plain = json.loads(cli(env, "result", task_id, "--json").stdout)[0]
    assert plain["state"] == "RETRY" and plain["url"] == url
    assert plain["retry"] == {
        "reason": "connection refused by 127.0.0.1:9",
        "due": None,
        "attempt": None,
    }
    backend = redis.Redis(
        port=client.backend.client.connection_pool.connection_kwargs["port"], db=1
    )
    due = time.time() + 42
    note = {"reason": "connection refused by 127.0.0.1:9", "due": due, "attempt": 2}
    backend.set(f"downloads:retry:{task_id}", json.dumps(note), ex=60)
    assert records.retry_notes(backend, [task_id, "nothing"]) == {
        task_id: records.RetryNote("connection refused by 127.0.0.1:9", due, 2)
    }
    row = json.loads(cli(env, "result", task_id, "--json").stdout)[0]
    assert row["retry"] == note
    text = cli(env, "result", task_id).stdout
    said = re.search(
        r"retrying: next attempt in (\d+) s \(attempt 2\): connection refused by 127.0.0.1:9",
        text,
    )
    assert said and 0 < int(said.group(1)) <= 42, text


def test_a_real_retry_in_status_and_in_wait(env, start_worker, origin):
    """A download that retries for real: `status` lists it (it is not active), and `wait`
    shows why and when the next attempt is due (from the worker's note)."""
    queue = f"retry-{uuid.uuid4().hex[:6]}"
    start_worker(queue=queue, concurrency=1, DOWNLOAD_RETRY_BACKOFF_MAX="60")
    url = f"{origin.url}/bytes/10?status=503&retry_after=30&seed={uuid.uuid4().hex}"
    submitted = time.time()
    [row] = json.loads(cli(env, "submit", url, "--queue", queue, "--json").stdout)

    def listed() -> dict[str, Any] | None:
        body = json.loads(cli(env, "status", "--queue", queue, "--json").stdout)
        return next((r for r in body["retrying"] if r["id"] == row["id"]), None)

    retrying = wait_for(listed, 30, "status to list the retrying download")
    # Due when the origin's Retry-After (30 s) says, counted from the failed attempt.
    assert "503" in retrying["reason"] and retrying["due"] >= submitted + 29
    text = cli(env, "status", "--queue", queue).stdout
    # Not active, yet not forgotten (other tests' downloads may be listed too).
    assert re.search(r"waiting to retry: [1-9]", text), text
    mine = next(line for line in text.splitlines() if row["id"] in line)
    assert re.search(r"next attempt in \d+ s.*: HTTP 503", mine), mine
    waited = json.loads(cli(env, "wait", row["id"], "--timeout", "1", "--json").stdout)[0]
    assert waited["state"] == "RETRY" and "503" in waited["retry"]["reason"]
    assert waited["retry"]["due"] is not None  # the worker's note: when it is due
    assert cli(env, "cancel", row["id"]).returncode == 0


def test_wait_warns_when_no_worker_consumes_the_queue(env, origin):
    queue = f"nobody-{uuid.uuid4().hex[:6]}"
    done = cli(
        env, "submit", f"{origin.url}/bytes/10", "--queue", queue, "--wait", "--timeout", "6"
    )
    assert done.returncode == 4
    assert f"warning: no worker consumes queue {queue!r}" in done.stderr
    assert "Traceback" not in done.stderr


def test_many_unfinished_ids_go_to_a_file_that_wait_reads(env, tmp_path):
    import io

    from download_client.watching import follow_hint

    parked = f"parked-{uuid.uuid4().hex[:6]}"
    urls = [f"http://127.0.0.1:9/{i}" for i in range(21)]
    ids = [
        r["id"] for r in json.loads(cli(env, "submit", *urls, "--queue", parked, "--json").stdout)
    ]
    err = io.StringIO()
    follow_hint(ids, err)
    saved = re.search(r"downloads wait -i (\S+)", err.getvalue())
    assert saved and Path(saved.group(1)).read_text().split() == ids
    waited = cli(env, "wait", "-i", saved.group(1), "--timeout", "0.5", "--json")
    assert waited.returncode == 4
    assert [r["id"] for r in json.loads(waited.stdout)] == ids
    Path(saved.group(1)).unlink()
    redis.Redis.from_url(env["CELERY_BROKER_URL"]).delete(parked)


def test_cancel_with_no_worker_online_cancels_nothing(env):
    # A broker database no worker listens on: the revoke has nobody to reach.
    alone = {**env, "CELERY_BROKER_URL": env["CELERY_BROKER_URL"].rsplit("/", 1)[0] + "/7"}
    [row] = json.loads(cli(alone, "submit", "http://127.0.0.1:9/x", "--json").stdout)
    refused = cli(alone, "cancel", row["id"])
    assert refused.returncode == 3 and "no worker answered" in refused.stderr
    redis.Redis.from_url(alone["CELERY_BROKER_URL"]).flushdb()


def test_submit_urgent_sends_to_the_express_lane(env, start_worker, origin, key):
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    queue = f"lane-{key[:6]}"
    done = cli(env, "submit", "--ids", "--queue", queue, "--urgent", f"{origin.url}/bytes/10")
    assert done.returncode == 0, done.stderr
    assert (broker.llen(queue), broker.llen(f"{queue}.urgent")) == (0, 1)
    broker.delete(f"{queue}.urgent")
    w = start_worker()
    url = f"{origin.url}/bytes/100?seed={key}"
    done = cli(env, "submit", "--queue", w.queue, "--urgent", "--wait", "--json", url)
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["state"] == "SUCCESS"


def test_submit_group_sends_to_the_groups_queue_and_status_counts_it(
    env, start_worker, origin, key
):
    broker = redis.Redis.from_url(env["CELERY_BROKER_URL"])
    queue = f"grp-{key[:6]}"
    urls = [f"{origin.url}/bytes/10?n={i}" for i in range(3)]
    done = cli(env, "submit", "--ids", "--queue", queue, "--group", "thumbs", *urls)
    assert done.returncode == 0, done.stderr
    assert (broker.llen(queue), broker.llen(f"{queue}.group-thumbs")) == (0, 3)
    shown = cli(env, "status", "--json", "--queue", queue)
    groups = json.loads(shown.stdout)["groups"]
    assert groups["thumbs"] == {"queued": 3, "parked": 0, "running": 0}
    assert json.loads(shown.stdout)["queue_depth"] == 3
    text = cli(env, "status", "--queue", queue).stdout
    assert "group thumbs: 3 queued, 0 parked, 0 running" in text
    refused = cli(env, "submit", "--queue", queue, "--group", "Thumbs", f"{origin.url}/bytes/1")
    assert refused.returncode == 2 and "group: 'Thumbs' is not a group name" in refused.stderr
    w = start_worker(queue=queue)  # reads the known group queues when it starts
    ids = done.stdout.split()
    waited = cli(env, "wait", "--json", "--timeout", "60", *ids)
    assert {r["state"] for r in json.loads(waited.stdout)} == {"SUCCESS"}, waited.stdout
    assert w.queue == queue


def test_submit_with_a_mirror_reports_which_url_served(env, worker, origin):
    seed = uuid.uuid4().hex
    dead, alive = f"{origin.url}/bytes/300000?status=404", f"{origin.url}/bytes/300000?seed={seed}"
    sha = body_sha256(300000, seed)
    done = cli(env, "submit", dead, "--sha256", sha, "--mirror", alive, "--wait", "--json")
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert row["result"]["sha256"] == sha and row["result"]["final_url"] == alive
    assert row["result"]["sources"] == [{"url": alive, "bytes": 300000, "requests": 1}]
    for bad, why in (
        ([dead, "--mirror", alive], "mirrors: a sha256 is required"),
        ([dead, dead, "--sha256", sha, "--mirror", alive], "give one URL with them"),
        ([dead, "--sha256", sha, "--mirror", "ftp://x/y"], "mirrors[0]: scheme must be http"),
    ):
        refused = cli(env, "submit", *bad)
        assert refused.returncode == 2 and why in refused.stderr, (bad, refused.stderr)
