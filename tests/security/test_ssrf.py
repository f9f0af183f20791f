"""With DOWNLOAD_ALLOW_PRIVATE=false, loopback in every spelling is refused
before a TCP connection (the origins count their connections)."""

from __future__ import annotations

import socket

import pytest
from celery import Celery

from tests.harness import Worker
from tests.security.conftest import Sandbox, mark
from tests.server import OriginServer

SPELLINGS = [
    "localhost",
    "LOCALHOST",
    "127.0.0.1",
    "127.0.0.1.",
    "127.1",
    "2130706433",
    "0x7f000001",
    "0x7f.1",
    "0177.0.0.1",
    "017700000001",
    "0.0.0.0",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "user:pw@127.0.0.1",
]


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host.strip("[]").rpartition("@")[2], 80, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("host", SPELLINGS)
def test_loopback_refused_before_connecting(
    client: Celery, ssrf: Worker, sandbox: Sandbox, origin: OriginServer, host: str
) -> None:
    if not _resolves(host):
        pytest.skip(f"{host} does not resolve on this machine")
    tag = mark()
    before = origin.stats.connections
    url = f"http://{host}:{origin.server_address[1]}/bytes/10?m={tag}"
    said = "which is not a public address (the workers' DOWNLOAD_ALLOW_PRIVATE setting allows it)"
    sandbox.refused(client, ssrf, said, url=url, dest=f"s/{tag}")
    assert origin.stats.connections == before, "a TCP connection reached the origin"
    assert sandbox.requests(tag) == 0


@pytest.mark.parametrize("host", ["[::1]", "[::]", "[0:0:0:0:0:0:0:1]"])
def test_ipv6_loopback_refused_before_connecting(
    client: Celery, ssrf: Worker, sandbox: Sandbox, origin6: OriginServer, host: str
) -> None:
    before = origin6.stats.connections
    url = f"http://{host}:{origin6.server_address[1]}/bytes/10"
    sandbox.refused(client, ssrf, "which is not a public address", url=url, dest=f"s/{mark()}")
    assert origin6.stats.connections == before


def test_redirect_to_loopback_refused(
    client: Celery, ssrf: Worker, sandbox: Sandbox, origin: OriginServer
) -> None:
    """Even the first hop is refused here; the per-hop check with an allowed first hop is in
    test_security_unit (127.0.0.1 allowed, [::1] not)."""
    before = origin.stats.connections
    url = f"{origin.url}/bytes/10?redirect=1&to=http://localhost:{origin.server_address[1]}/x"
    sandbox.refused(client, ssrf, "not a public address", url=url, dest=f"s/{mark()}")
    assert origin.stats.connections == before
