"""Header values and URL credentials never shown."""

from __future__ import annotations

import json
import threading
from typing import Any

from celery import Celery

from tests.conftest import submit
from tests.harness import Worker, free_port, wait_for
from tests.security.conftest import Sandbox, mark
from tests.server import OriginServer


class EventLog:
    """Every event on the broker while it runs (task-sent from retries included)."""

    def __init__(self, client: Celery) -> None:
        self.client, self.events = client, list[dict[str, Any]]()
        self.ready = mark()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.client.connection_for_read() as conn:
            self.receiver = self.client.events.Receiver(conn, handlers={"*": self.events.append})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> EventLog:
        self.thread.start()
        with self.client.connection_for_write() as conn:
            dispatcher = self.client.events.Dispatcher(conn)

            def ping() -> bool:
                dispatcher.send("test-ready", marker=self.ready)
                return any(e.get("marker") == self.ready for e in self.events)

            wait_for(ping, 30, "the event receiver")
            dispatcher.close()
        return self

    def __exit__(self, *exc: object) -> None:
        self.receiver.should_stop = True
        self.thread.join(10)


def test_secrets_stay_out_of_logs_events_inspect_and_results(
    client: Celery, sec: Worker, sandbox: Sandbox, origin: OriginServer
) -> None:
    tag = mark()
    secrets = [f"PASSWORD{tag}", f"TOKEN{tag}", f"SIG{tag}", f"BEARER{tag}", f"COOKIE{tag}"]
    port = origin.server_address[1]
    url = (
        f"http://user:{secrets[0]}@127.0.0.1:{port}/bytes/300000?rate=300000&flaky=1&key={tag}"
        f"&m={tag}&access_token={secrets[1]}&X-Amz-Signature={secrets[2]}"
    )
    headers = {"X-Api-Key": f"Bearer {secrets[3]}", "Cookie": f"s={secrets[4]}"}
    with EventLog(client) as log:
        res = submit(client, sec, url=url, dest=f"secret/{tag}", headers=headers)

        def active() -> list[Any]:
            found = client.control.inspect([sec.hostname], timeout=1).active() or {}
            return [t for t in found.get(sec.hostname, []) if t["id"] == res.id]

        shown = wait_for(active, 30, "the task in inspect().active()")
        done = res.get(timeout=30)
        wait_for(
            lambda: any(
                e.get("type") == "task-succeeded" and e.get("uuid") == res.id for e in log.events
            ),
            30,
            "task-succeeded",
        )
    assert sandbox.requests(tag) == 2, "the 503 was retried once"
    ours = [e for e in log.events if e.get("uuid") == res.id]
    assert {"task-received", "task-retried", "task-sent", "task-succeeded"} <= {
        e["type"] for e in ours
    }
    for place, text in [
        ("inspect active", json.dumps(shown)),
        ("events", json.dumps(ours, default=str)),
        ("result", json.dumps(done)),
        ("worker log", sec.log()),
    ]:
        for secret in secrets:
            assert secret not in text, f"{secret} in the {place}"
    assert done["url"] == done["final_url"]
    assert "user:***@127.0.0.1" in done["url"] and "access_token=***" in done["url"]
    # The requests themselves did carry them: redaction is for display only.
    first = [r for r in origin.stats.requests if r.query.get("m") == tag][-1]
    assert first.headers["X-Api-Key"] == f"Bearer {secrets[3]}"
    assert first.query["access_token"] == secrets[1]


def test_connection_error_message_shows_no_query(
    client: Celery, sec: Worker, sandbox: Sandbox
) -> None:
    """urllib3 puts the request's path and query in 'Max retries exceeded with url: ...'; the
    failure message (result, events, log) must not carry the token that came with it."""
    tag = mark()
    port = free_port()
    url = f"http://127.0.0.1:{port}/x?access_token=SECRET{tag}"  # nothing listens there
    said = f"connection refused by 127.0.0.1:{port}, 2 attempts over "
    message = sandbox.refused(client, sec, said, url=url, dest=f"c/{tag}")
    assert f"SECRET{tag}" not in message
    assert f"SECRET{tag}" not in sec.log()
