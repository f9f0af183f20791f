"""Redirects: at most 10 hops, each hop re-checked, caller headers kept to
their host."""

from __future__ import annotations

import pytest
from celery import Celery

from tests.conftest import run
from tests.harness import Worker
from tests.security.conftest import Sandbox, mark
from tests.server import OriginServer


def test_ten_redirects_are_followed(client: Celery, sec: Worker, sandbox: Sandbox) -> None:
    tag = mark()
    done = run(
        client, sec, url=f"{sandbox.origin.url}/bytes/10?redirect=10&m={tag}", dest=f"r/{tag}"
    )
    assert done["size"] == 10
    assert sandbox.requests(tag) == 11


@pytest.mark.parametrize(
    ("query", "expect", "requests"),
    [
        ("redirect=11", "more than 10 redirects", 11),
        ("redirect=1&to=%23loop", "more than 10 redirects", 11),  # Location: #loop, the same URL
        ("redirect=1&to=file:///etc/passwd", "redirect refused: url: scheme must be", 1),
        ("redirect=1&to=ftp://127.0.0.1/x", "redirect refused: url: scheme must be", 1),
        ("redirect=1&to=gopher://127.0.0.1:70/x", "redirect refused: url: scheme must be", 1),
        ("redirect=1&to=https:///nohost", "redirect refused: url: has no host", 1),
        ("redirect=1&to=http://127.0.0.1:0/", "redirect refused: url: port 0", 1),
    ],
    ids=["chain-11", "loop", "to-file", "to-ftp", "to-gopher", "to-no-host", "to-port-0"],
)
def test_bad_redirect_fails(
    client: Celery, sec: Worker, sandbox: Sandbox, query: str, expect: str, requests: int
) -> None:
    tag = mark()
    url = f"{sandbox.origin.url}/bytes/10?{query}&m={tag}"
    sandbox.refused(client, sec, expect, tag=tag, requests=requests, url=url, dest=f"r/{tag}")


def test_redirect_host_confusion_refused(
    client: Celery, sec: Worker, sandbox: Sandbox, origin: OriginServer
) -> None:
    """Location http://localhost:P\\@127.0.0.1:P/: urlsplit reads host 127.0.0.1 (the caller's
    origin, so its headers would go along) while urllib3 connects to localhost. Refused."""
    tag, port = mark(), origin.server_address[1]
    to = f"http://localhost:{port}%5C@127.0.0.1:{port}/bytes/10%3Fm%3D{tag}"
    url = f"{origin.url}/bytes/10?redirect=1&to={to}&m={tag}"
    sandbox.refused(
        client,
        sec,
        "redirect refused: url: must not contain a backslash",
        tag=tag,
        requests=1,
        url=url,
        dest=f"r/{tag}",
        headers={"Authorization": f"Bearer {tag}"},
    )


def _auth_seen(origin: OriginServer, tag: str) -> list[tuple[str, str | None, str | None]]:
    with origin.stats.lock:
        return [
            (r.headers.get("Host", ""), r.headers.get("Authorization"), r.headers.get("Cookie"))
            for r in origin.stats.requests
            if tag in (r.query.get("m"), r.path.rsplit("/", 1)[-1])
        ]


def test_caller_headers_stay_with_their_host(
    client: Celery, sec: Worker, sandbox: Sandbox, origin: OriginServer
) -> None:
    """127.0.0.1 -> 127.0.0.1 (same origin: headers kept) -> localhost (another host: dropped)."""
    tag, port = mark(), origin.server_address[1]
    last = f"http://localhost:{port}/bytes/10?m={tag}"
    url = f"{origin.url}/bytes/10?redirect=2&to={last.replace('?', '%3F')}&m={tag}"
    headers = {"Authorization": f"Bearer {tag}", "Cookie": f"s={tag}"}
    run(client, sec, url=url, dest=f"r/{tag}", headers=headers)
    seen = _auth_seen(origin, tag)
    assert [h[1:] for h in seen] == [
        (f"Bearer {tag}", f"s={tag}"),
        (f"Bearer {tag}", f"s={tag}"),
        (None, None),
    ], seen
    assert seen[-1][0].startswith("localhost")


def test_caller_headers_not_sent_to_ipv6_host(
    client: Celery, sec: Worker, sandbox: Sandbox, origin: OriginServer, origin6: OriginServer
) -> None:
    tag = mark()
    url = f"{origin.url}/bytes/10?redirect=1&to={origin6.url}/bytes/10%3Fm%3D{tag}&m={tag}"
    run(client, sec, url=url, dest=f"r/{tag}", headers={"Authorization": f"Bearer {tag}"})
    assert [a for _, a, _ in _auth_seen(origin, tag)] == [f"Bearer {tag}"]
    assert [a for _, a, _ in _auth_seen(origin6, tag)] == [None]
