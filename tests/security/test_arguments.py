"""Bad arguments are refused before any connection is made."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from tests.harness import Worker
from tests.security.conftest import Sandbox, mark

LONG = "x" * 9000
ARGUMENTS: list[tuple[str, Callable[[str], dict[str, Any]], str]] = [
    ("unknown-kwarg", lambda u: {"url": u, "evil": 1}, "unknown argument 'evil'"),
    ("url-missing", lambda u: {"dest": "a"}, "url: required"),
    ("url-not-str", lambda u: {"url": [u]}, "url: expected a string"),
    ("url-file", lambda u: {"url": "file:///etc/passwd"}, "scheme must be http or https"),
    ("url-ftp", lambda u: {"url": u.replace("http", "ftp")}, "scheme must be http or https"),
    ("url-gopher", lambda u: {"url": u.replace("http", "gopher")}, "scheme must be"),
    ("url-no-host", lambda u: {"url": "http:///bytes/1"}, "url: has no host"),
    ("url-too-long", lambda u: {"url": f"{u}&pad={LONG}"}, "url: longer than 8192"),
    ("url-crlf", lambda u: {"url": f"{u}\r\nX-Injected: 1"}, "url: must not contain"),
    ("url-backslash", lambda u: {"url": u.replace("/bytes", "\\@x/bytes")}, "backslash"),
    ("url-surrogate", lambda u: {"url": u + "\ud800"}, "lone surrogate"),
    ("url-pct-host", lambda u: {"url": u.replace("127.0.0.1", "127.0.0%2e1")}, "percent-encoded"),
    ("url-port-0", lambda u: {"url": "http://127.0.0.1:0/"}, "url: port 0"),
    ("url-bad-port", lambda u: {"url": "http://127.0.0.1:99999/"}, "url: not a valid URL"),
    ("sha-short", lambda u: {"url": u, "sha256": "abc"}, "sha256: expected 64"),
    ("sha-not-hex", lambda u: {"url": u, "sha256": "g" * 64}, "sha256: expected 64"),
    ("max-bytes-0", lambda u: {"url": u, "max_bytes": 0}, "max_bytes: expected a positive"),
    ("max-bytes-bool", lambda u: {"url": u, "max_bytes": True}, "max_bytes: expected"),
    ("max-bytes-str", lambda u: {"url": u, "max_bytes": "10"}, "max_bytes: expected"),
    ("headers-list", lambda u: {"url": u, "headers": ["a"]}, "headers: expected an object"),
    (
        "header-crlf",
        lambda u: {"url": u, "headers": {"X-A": "1\r\nX-Injected: 1"}},
        "contains CR, LF or NUL",
    ),
    ("header-host", lambda u: {"url": u, "headers": {"Host": "evil"}}, "set by the downloader"),
    ("header-range", lambda u: {"url": u, "headers": {"range": "bytes=0-"}}, "set by the"),
    ("header-te", lambda u: {"url": u, "headers": {"Transfer-Encoding": "x"}}, "set by the"),
    ("header-ae", lambda u: {"url": u, "headers": {"Accept-Encoding": "gzip"}}, "set by the"),
    ("header-int", lambda u: {"url": u, "headers": {"X-A": 1}}, "must be a string"),
    ("header-name", lambda u: {"url": u, "headers": {"X A:": "1"}}, "not a valid header name"),
    ("header-many", lambda u: {"url": u, "headers": {f"X-{i}": "1" for i in range(51)}}, "more"),
    ("header-utf8", lambda u: {"url": u, "headers": {"X-A": "\u2603"}}, "not Latin-1"),
]


@pytest.mark.parametrize(
    ("make", "expect"), [a[1:] for a in ARGUMENTS], ids=[a[0] for a in ARGUMENTS]
)
def test_bad_argument_refused_before_connecting(
    client: Celery,
    sec: Worker,
    sandbox: Sandbox,
    make: Callable[[str], dict[str, Any]],
    expect: str,
) -> None:
    tag = mark()
    kwargs = make(f"{sandbox.origin.url}/bytes/10?m={tag}")
    sandbox.refused(client, sec, expect, tag=tag, requests=0, **kwargs)


def test_too_many_positional_arguments(client: Celery, sec: Worker, sandbox: Sandbox) -> None:
    tag = mark()
    res = client.send_task(
        "downloads.fetch",
        args=[f"{sandbox.origin.url}/bytes/1?m={tag}", *"abcdefghi"],
        queue=sec.queue,
    )
    with pytest.raises(Exception, match="at most 9 positional arguments"):
        res.get(timeout=30)
    assert sandbox.requests(tag) == 0
    sandbox.assert_contained()
    sandbox.serves(client, sec)
