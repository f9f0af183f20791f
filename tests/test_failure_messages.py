"""End to end: what a failed or retrying download says, read where a client reads it (the result,
and the retry note beside it in the result backend's Redis). The default worker retries 3 times
with backoff capped at 0.3 s."""

from __future__ import annotations

import http.client
import json
import re
import socket
import time

import pytest
import requests
import urllib3.exceptions as u3

from tasks.core.failures import on_request
from tasks.core.http import new_session
from tasks.retries import note_ttl
from tests.conftest import failure, submit
from tests.harness import free_port, wait_for

URL = "https://files.example:8443/a/b?token=tok-in-the-query"


def test_a_refused_port_fails_with_curls_words_and_the_attempts(client, worker):
    port = free_port()  # nothing listens there
    url = f"http://127.0.0.1:{port}/x?access_token=tok-in-the-query"
    state, message = failure(client, worker, url=url, dest="refused.bin")
    said = rf"connection refused by 127\.0\.0\.1:{port}, 4 attempts over [0-9.]+ (s|min)"
    assert state == "FAILURE" and re.fullmatch(said, message), message
    assert "tok-in-the-query" not in message and "/x" not in message


def test_a_reset_mid_body_says_who_reset_it_and_after_how_much(client, worker, origin, key):
    # No validators: every attempt starts from zero, so each is reset after about 1.2 MiB.
    url = f"{origin.url}/bytes/3000000?cut=1300000&reset=1&noetag=1&nolm=1&key={key}"
    state, message = failure(client, worker, url=url, dest=f"reset/{key}.bin")
    host = origin.url.removeprefix("http://")
    said = rf"connection reset by {host} after [0-9.]+ (KiB|MiB), 4 attempts over .+"
    assert state == "FAILURE" and re.fullmatch(said, message), message


def test_a_download_in_retry_leaves_a_note_with_the_reason_and_when_it_is_due(
    client, start_worker, origin, key
):
    w = start_worker(concurrency=1, DOWNLOAD_RETRY_BACKOFF_MAX="30")
    url = f"{origin.url}/bytes/100?flaky=1&fail=503&retry_after=4&key={key}"
    res = submit(client, w, url=url, dest=f"later/{key}.bin")
    redis = client.backend.client  # the result backend's Redis, where clients read results
    wait_for(lambda: res.state == "RETRY", 30, "the download to be in RETRY")
    raw = redis.get(f"downloads:retry:{res.id}")
    assert raw is not None, "no retry note while in RETRY"
    note = json.loads(raw)
    reason = f"HTTP 503 Service Unavailable from {origin.url.removeprefix('http://')}"
    assert note["reason"] == reason and str(res.info) == reason
    assert note["attempt"] == 1
    assert note["due"] > time.time()  # the 4 s Retry-After has not run out yet
    assert 0 < redis.ttl(f"downloads:retry:{res.id}") <= 4 + 60
    assert res.get(timeout=30)["attempts"] == 2


def test_a_retry_note_never_outlives_the_results():
    assert note_ttl(4, 3600) == 64 and note_ttl(7200, 3600) == 3600


def test_a_name_that_does_not_resolve_is_named(monkeypatch):
    def no_such_host(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)  # no resolver is asked
    with pytest.raises(requests.ConnectionError) as info:
        new_session(allow_private=False).get("http://files.example.invalid/x?token=t", timeout=1)
    assert str(on_request(info.value, "http://files.example.invalid/x?token=t")) == (
        "could not resolve host files.example.invalid"
    )


def _wrapped(cause: Exception) -> requests.ConnectionError:
    """What requests raises: its error around urllib3's MaxRetryError around the cause, with
    the URL's path and query in the text."""
    pool = u3.MaxRetryError(None, "/a/b?token=tok-in-the-query", cause)  # type: ignore[arg-type]
    return requests.ConnectionError(pool)


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (
            requests.ConnectTimeout(_wrapped(u3.ConnectTimeoutError(None, "timed out"))),
            "timed out after 5 s connecting to files.example:8443",
        ),
        (
            _wrapped(u3.ProtocolError("Connection aborted.", http.client.RemoteDisconnected())),
            "empty reply from files.example:8443",
        ),
        (
            _wrapped(u3.ProtocolError("Connection aborted.", ConnectionResetError(104, "reset"))),
            "connection reset by files.example:8443",
        ),
    ],
    ids=["connect-timeout", "empty-reply", "reset"],
)
def test_causes_deep_in_the_chain_are_named_without_the_path(raised, said):
    mapped = on_request(raised, URL, (5, 30))
    assert type(mapped).__name__ == "TransientError" and str(mapped) == said
