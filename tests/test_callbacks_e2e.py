"""Completion callbacks against real workers and a real receiver that verifies signatures and
refuses replays: success, failure, revoke, a receiver down for a while, one that never accepts,
a host off the allowlist, and a worker SIGKILLed while its callback is still being retried."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import TASK, failure, submit
from tests.harness import ROOT, free_port, wait_for
from tests.receiver import Receiver
from tests.server import body_sha256

SECRET = "whsec-test-8c1d"
ENV = {"DOWNLOAD_CALLBACK_SECRET": SECRET, "DOWNLOAD_CALLBACK_ALLOW": "127.0.0.1"}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(SECRET).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def hooked(start_worker):
    return start_worker(**ENV, DOWNLOAD_CALLBACK_BACKOFF_MAX="1", DOWNLOAD_CALLBACK_GIVE_UP="60")


def _one(receiver: Receiver, task_id: str) -> dict:
    got = wait_for(lambda: receiver.book.accepted(task_id), 30, "the callback")
    assert len(got) == 1
    return got[0].body


def test_a_success_is_called_back_once_signed(client, hooked, origin, receiver, key):
    url = f"{origin.url}/bytes/4000?seed={key}"
    res = submit(client, hooked, url=url, dest=f"{key}.bin", callback_url=receiver.url)
    res.get(timeout=30)
    body = _one(receiver, res.id)
    assert body["state"] == "SUCCESS" and body["result"]["sha256"] == body_sha256(4000, key)
    assert not [d for d in receiver.book.deliveries if d.verdict == 401]


def test_a_failure_is_called_back_with_its_error(client, hooked, origin, receiver, key):
    url = f"{origin.url}/bytes/10?key={key}&status=404"
    res = submit(client, hooked, url=url, dest=f"{key}.bin", callback_url=receiver.url)
    with pytest.raises(Exception, match="404"):
        res.get(timeout=30)
    body = _one(receiver, res.id)
    assert body["state"] == "FAILURE" and "HTTP 404" in body["error"]


def test_a_failed_download_delivered_again_is_not_fetched_again(
    client, hooked, origin, receiver, key
):
    """A copy delivered again of a download whose FAILURE is stored (its acknowledgement lost,
    as in a broker crash): no request, the FAILURE stays, and its callback is queued again
    (receivers dedupe by task id)."""
    kwargs = {"url": f"{origin.url}/bytes/3000?key={key}", "dest": f"{key}.bin",
              "sha256": "0" * 64, "callback_url": receiver.url}  # fmt: skip
    res = client.send_task(TASK, kwargs=kwargs, queue=hooked.queue)
    with pytest.raises(Exception, match="sha256 mismatch"):
        res.get(timeout=30)
    _one(receiver, res.id)
    client.send_task(TASK, kwargs=kwargs, queue=hooked.queue, task_id=res.id)
    wait_for(lambda: receiver.book.attempts(res.id) >= 2, 30, "the callback queued again")
    assert len(origin.stats.for_key(key)) == 1, "fetched again"
    assert res.state == "FAILURE"


def test_a_revoked_download_is_called_back_from_the_main_process(client, hooked, origin, receiver):
    url = f"{origin.url}/bytes/2000000?seed=rv&rate=50000"
    res = submit(client, hooked, url=url, dest="revoked.bin", callback_url=receiver.url)
    wait_for(lambda: res.state == "PROGRESS", 30, "the download to run")
    res.revoke(terminate=True)
    assert _one(receiver, res.id)["state"] == "REVOKED"


def test_a_receiver_that_comes_back_gets_it_once(client, hooked, origin, key):
    port = free_port()
    hook = f"http://127.0.0.1:{port}/hook"
    res = submit(client, hooked, url=f"{origin.url}/bytes/100?seed={key}", dest=f"{key}.bin",
                 callback_url=hook)  # fmt: skip
    res.get(timeout=30)
    wait_for(lambda: "callback" in hooked.log() and "Retry in" in hooked.log(), 30, "a retry")
    late = Receiver(SECRET, port=port).start()
    try:
        assert _one(late, res.id)["state"] == "SUCCESS"
    finally:
        late.stop()


def test_a_receiver_that_never_accepts_is_given_up_and_recorded(start_worker, client, origin, key):
    never = Receiver(SECRET, status=500).start()
    w = start_worker(**ENV, DOWNLOAD_CALLBACK_BACKOFF_MAX="0.5", DOWNLOAD_CALLBACK_GIVE_UP="3")
    try:
        res = submit(client, w, url=f"{origin.url}/bytes/100?seed={key}", dest=f"{key}.bin",
                     callback_url=never.url)  # fmt: skip
        res.get(timeout=30)
        backend = client.backend.client
        raw = wait_for(lambda: backend.get(f"downloads:callback-given-up:{res.id}"), 30, "give-up")
        assert "gave up after" in json.loads(raw)["why"]
        assert never.book.attempts(res.id) >= 3
        assert re.search(rf"callback for {res.id} to .* gave up after", w.log())
    finally:
        never.stop()


def test_a_callback_host_off_the_allowlist_is_refused_before_anything_connects(
    start_worker, client, origin, receiver, key
):
    w = start_worker(DOWNLOAD_CALLBACK_SECRET=SECRET, DOWNLOAD_CALLBACK_ALLOW="hooks.internal.test")
    state, message = failure(client, w, url=f"{origin.url}/bytes/10?key={key}", dest=f"{key}.bin",
                             callback_url=receiver.url)  # fmt: skip
    assert state == "FAILURE" and "not on DOWNLOAD_CALLBACK_ALLOW" in message
    assert receiver.book.connections == 0 and not origin.stats.for_key(key)


def test_a_worker_killed_while_its_callback_is_pending_still_delivers(
    start_worker, client, origin, key
):
    """The receiver is down, the callback waits for its retry in the worker; the whole worker is
    SIGKILLed. A new worker on the queue delivers it once the receiver is up."""
    port, queue = free_port(), f"killed-{key[:6]}"
    settings = {**ENV, "DOWNLOAD_CALLBACK_BACKOFF_MAX": "3", "DOWNLOAD_VISIBILITY_TIMEOUT": "25",
                "DOWNLOAD_TIME_LIMIT": "20", "DOWNLOAD_SOFT_TIME_LIMIT": "15"}  # fmt: skip
    first = start_worker(queue=queue, **settings)
    res = submit(client, first, url=f"{origin.url}/bytes/100?seed={key}", dest=f"{key}.bin",
                 callback_url=f"http://127.0.0.1:{port}/hook")  # fmt: skip
    res.get(timeout=30)
    wait_for(lambda: first.log().count("Retry in") >= 2, 30, "the callback to be retrying")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)
    late = Receiver(SECRET, port=port).start()
    try:
        start_worker(queue=queue, **settings)
        assert _one_within(late, res.id, 90)["state"] == "SUCCESS"
    finally:
        late.stop()


def _one_within(receiver: Receiver, task_id: str, timeout: float) -> dict:
    got = wait_for(lambda: receiver.book.accepted(task_id), timeout, "the callback")
    return got[0].body


def _snippet(language: str) -> str:
    readme = (ROOT / "docs" / "callbacks.md").read_text()
    block = re.search(
        rf"```{language}\n(# verify-callback|// verify-callback)\n(.*?)```", readme, re.S
    )
    assert block, f"the callbacks page's {language} verification snippet"
    return block.group(2)


def test_the_readmes_verification_snippets_accept_a_real_delivery(
    client, hooked, origin, receiver, key, tmp_path: Path
):
    res = submit(client, hooked, url=f"{origin.url}/bytes/50?seed={key}", dest=f"{key}.bin",
                 callback_url=receiver.url)  # fmt: skip
    res.get(timeout=30)
    delivery = wait_for(lambda: receiver.book.accepted(res.id), 30, "the callback")[0]
    scope: dict = {}
    exec(_snippet("python"), scope)
    assert scope["verify"](SECRET, delivery.signature, delivery.raw)
    assert not scope["verify"](SECRET, delivery.signature, delivery.raw + b" ")
    script = tmp_path / "verify.js"
    script.write_text(
        _snippet("js")
        + "\nconst [secret, header, body] = process.argv.slice(2);\n"
        + "process.exit(verify(secret, header, Buffer.from(body)) ? 0 : 1);\n"
    )
    args = ["node", str(script), SECRET, delivery.signature]
    assert subprocess.run([*args, delivery.raw.decode()]).returncode == 0
    assert subprocess.run([*args, delivery.raw.decode() + " "]).returncode == 1


def test_a_download_that_gave_up_at_its_deadline_is_called_back_saying_so(
    client, hooked, receiver, key
):
    port = free_port()  # nothing listens there: every attempt is refused
    url = f"http://127.0.0.1:{port}/bytes/10?key={key}"
    res = submit(client, hooked, url=url, dest=f"{key}.bin", callback_url=receiver.url, deadline=3)
    with pytest.raises(Exception, match="gave up at the deadline"):
        res.get(timeout=60)
    body = _one(receiver, res.id)
    said = (
        rf"connection refused by 127\.0\.0\.1:{port}, gave up at the deadline after \d+ "
        r"attempts over [0-9.]+ s"
    )
    assert body["state"] == "FAILURE" and re.fullmatch(said, body["error"]), body
