"""At unit level: address classification (pure functions only: no test ever connects to
a private-range or public address), DNS answers changed under the check (loopback only), the
per-hop check of redirects, cookies, and what error messages and result URLs show."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import pytest
import requests

import tasks.core.http
from download_client.errors import BlockedAddressError
from download_client.redact import redact_url
from tasks.core.failures import describe
from tasks.core.http import address_allowed, new_session, resolve_checked
from tasks.core.redirects import opened
from tests.server import Handler, OriginServer

REFUSED = [
    "127.0.0.1",
    "127.255.255.254",
    "0.0.0.0",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.1.1",
    "169.254.169.254",  # cloud metadata
    "100.64.0.1",  # shared (CGNAT)
    "192.0.0.1",
    "192.0.2.1",  # documentation
    "198.18.0.1",  # benchmarking
    "224.0.0.1",  # multicast
    "240.0.0.1",  # reserved
    "255.255.255.255",
    "::1",
    "::",
    "fe80::1",
    "fc00::1",
    "fd00:ec2::254",
    "ff02::1",
    "2001:db8::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "2002:7f00:1::1",  # 6to4 around 127.0.0.1
    "2002:a00:1::1",  # 6to4 around 10.0.0.1
    "2001::1",  # Teredo
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
]
ALLOWED = ["8.8.8.8", "1.1.1.1", "93.184.215.14", "2606:4700:4700::1111", "::ffff:8.8.8.8"]


@pytest.mark.parametrize("address", REFUSED)
def test_internal_addresses_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


def _answers(table: dict[str, list[str]]) -> Callable[..., Any]:
    """A getaddrinfo that answers names in `table` and hands numeric hosts to the real one."""
    real = socket.getaddrinfo

    def fake(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host not in table:
            return real(host, port, *args, **kwargs)
        answer = table[host].pop(0) if len(table[host]) > 1 else table[host][0]
        if answer == "NXDOMAIN":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        family = socket.AF_INET6 if ":" in answer else socket.AF_INET
        sockaddr = (answer, port, 0, 0) if family == socket.AF_INET6 else (answer, port)
        return [(family, socket.SOCK_STREAM, 6, "", sockaddr)]

    return fake


def test_resolve_checked_refuses_any_internal_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", _answers({"internal.test": ["10.1.2.3"]}))
    with pytest.raises(BlockedAddressError, match=r"resolves to 10\.1\.2\.3"):
        resolve_checked("internal.test", 80, allow_private=False)
    assert resolve_checked("internal.test", 80, allow_private=True) == [
        (socket.AF_INET, "10.1.2.3")
    ]


def test_resolve_checked_refuses_a_name_mixing_public_and_internal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = socket.getaddrinfo

    def both(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "mixed.test":
            return real(host, port, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("8.8.8.8", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", both)
    with pytest.raises(BlockedAddressError, match=r"127\.0\.0\.1"):
        resolve_checked("mixed.test", 80, allow_private=False)


def test_rebinding_to_loopback_is_refused_at_connect(
    monkeypatch: pytest.MonkeyPatch, origin: OriginServer
) -> None:
    """A name that answers 127.0.0.1 when the connection is made: refused, no TCP connection."""
    monkeypatch.setattr(socket, "getaddrinfo", _answers({"rebind.test": ["127.0.0.1"]}))
    before = origin.stats.connections
    with pytest.raises(BlockedAddressError, match=r"'rebind\.test': it resolves to 127\.0\.0\.1"):
        new_session(allow_private=False).get(f"http://rebind.test:{origin.server_address[1]}/")
    assert origin.stats.connections == before


def test_the_checked_answer_is_the_one_dialled(
    monkeypatch: pytest.MonkeyPatch, origin: OriginServer, origin6: OriginServer
) -> None:
    """Resolve once, dial that: a second DNS answer (here ::1, which the check refuses) never
    reaches the socket. Only 127.0.0.1 is allowed for this test."""
    port = origin.server_address[1]
    origin6_conns = origin6.stats.connections
    monkeypatch.setattr(socket, "getaddrinfo", _answers({"rebind.test": ["127.0.0.1", "::1"]}))
    monkeypatch.setattr(tasks.core.http, "address_allowed", lambda ip: str(ip) == "127.0.0.1")
    with new_session(allow_private=False) as session:
        response = session.get(f"http://rebind.test:{port}/bytes/10")
    assert response.status_code == 200
    assert origin6.stats.connections == origin6_conns


def test_a_failed_lookup_is_not_retried_unchecked(
    monkeypatch: pytest.MonkeyPatch, origin: OriginServer
) -> None:
    """The first answer fails, the next is loopback: the failure must not fall back to a lookup
    that nothing checks."""
    answers = {"flaky.test": ["NXDOMAIN", "127.0.0.1"]}
    monkeypatch.setattr(socket, "getaddrinfo", _answers(answers))
    before = origin.stats.connections
    with pytest.raises(requests.ConnectionError, match=r"resolve|Name or service"):
        new_session(allow_private=False).get(f"http://flaky.test:{origin.server_address[1]}/")
    assert origin.stats.connections == before


def test_each_redirect_hop_is_checked_at_connect(
    monkeypatch: pytest.MonkeyPatch, origin: OriginServer, origin6: OriginServer
) -> None:
    """First hop allowed (127.0.0.1 counts as public for this test), second hop [::1] refused:
    its origin never sees a connection."""
    monkeypatch.setattr(tasks.core.http, "address_allowed", lambda ip: str(ip) == "127.0.0.1")
    before = origin6.stats.connections
    url = f"{origin.url}/bytes/10?redirect=1&to={origin6.url}/bytes/10"
    with (
        new_session(allow_private=False) as session,
        pytest.raises(BlockedAddressError, match="'::1'"),
        opened(session, url, {}, (2, 2)),
    ):
        pass
    assert origin6.stats.connections == before


def test_cookies_set_by_a_server_are_never_sent_back(
    monkeypatch: pytest.MonkeyPatch, origin: OriginServer
) -> None:
    """One session serves every task of a process: a cookie one server set for one caller's
    download must not ride along with the next caller's request."""
    send = Handler._send

    def with_cookie(
        self: Handler, status: int, data: bytes, headers: Any = None, **kw: Any
    ) -> None:
        send(self, status, data, {**(headers or {}), "Set-Cookie": "sid=THEIRS; Path=/"}, **kw)

    session = new_session(allow_private=True)
    monkeypatch.setattr(Handler, "_send", with_cookie)
    session.get(f"{origin.url}/bytes/10?redirect=1").close()
    monkeypatch.setattr(Handler, "_send", send)
    session.get(f"{origin.url}/bytes/10?m=after-cookie").close()
    with origin.stats.lock:
        (last,) = [r for r in origin.stats.requests if r.query == {"m": "after-cookie"}]
    assert "Cookie" not in last.headers
    assert len(session.cookies) == 0


def test_error_messages_carry_no_url_path_or_query() -> None:
    exc = requests.ConnectionError(
        "HTTPConnectionPool(host='h.test', port=80): Max retries exceeded with url: "
        "/x?access_token=SECRET (Caused by NewConnectionError('refused'))"
    )
    text = describe(exc)
    assert "SECRET" not in text and "h.test" not in text and "with url: <url>" in text


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://u:pw@h.test/a", "https://u:***@h.test/a"),
        ("https://tok@h.test/a", "https://***@h.test/a"),
        (
            "https://h.test/a?X-Amz-Signature=s&X-Amz-Credential=c&n=1",
            "https://h.test/a?X-Amz-Signature=***&X-Amz-Credential=***&n=1",
        ),
        (
            "https://h.test/a?access_token=t&api_key=k&sig=s&password=p",
            "https://h.test/a?access_token=***&api_key=***&sig=***&password=***",
        ),
        ("https://h.test/a?%73ig=s", "https://h.test/a?%73ig=***"),
        ("https://h.test/a?q=1#token=frag", "https://h.test/a?q=1#token=***"),
        ("https://h.test/a?Token=t&SIG=s", "https://h.test/a?Token=***&SIG=***"),
        (
            "https://h.test/a?X-Goog-Signature=s&se=2030",
            "https://h.test/a?X-Goog-Signature=***&se=2030",
        ),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown
