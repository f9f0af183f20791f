"""Hostile servers end in a clear failure with nothing half-written."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery

from tests.conftest import run
from tests.harness import Worker
from tests.security.conftest import Sandbox, mark
from tests.server import gzipped_zeros


def test_gzip_bomb_is_stored_compressed(client: Celery, sec: Worker, sandbox: Sandbox) -> None:
    """100 MB of zeros gzipped, Content-Encoding not asked for: stored as received, never
    inflated (the 4 MB cap would stop an inflating client)."""
    tag = mark()
    gzipped_zeros(100_000_000)  # made before, so the origin answers within the read timeout
    done = run(
        client, sec, url=f"{sandbox.origin.url}/bytes/100000000?gzip=1&m={tag}", dest=f"g/{tag}"
    )
    data = (sandbox.root / "g" / tag).read_bytes()
    assert data[:2] == b"\x1f\x8b" and done["size"] == len(data) < 200_000
    assert sandbox.requests(tag) == 1
    sandbox.assert_contained()


@pytest.mark.parametrize(
    ("query", "kwargs", "expect", "requests"),
    [
        ("endless=1", {}, "the body passed the 4000000-byte limit", 1),
        ("endless=1", {"max_bytes": 100_000}, "the body passed the 100000-byte limit", 1),
        ("", {"max_bytes": 1000}, "over the 1000-byte limit", 1),  # Content-Length says too much
        ("short=5000", {}, "connection closed by 127.0.0.1:", 2),  # Content-Length lies
        ("short=0&noetag=1&nolm=1", {}, ", 2 attempts over ", 2),
        ("flood=200", {}, "malformed: got more than 100 headers", 1),
        ("stall=5", {}, "timed out", 2),
        ("status=404", {}, "HTTP 404", 1),
        ("status=500", {}, "HTTP 500 Internal Server Error from 127.0.0.1:", 2),
    ],
    ids=[
        "endless",
        "endless-max-bytes",
        "too-long",
        "short",
        "short-no-validator",
        "header-flood",
        "stall",
        "404",
        "500",
    ],
)
def test_hostile_server_fails_cleanly(
    client: Celery,
    sec: Worker,
    sandbox: Sandbox,
    query: str,
    kwargs: dict[str, Any],
    expect: str,
    requests: int,
) -> None:
    tag = mark()
    url = f"{sandbox.origin.url}/bytes/200000?{query}&m={tag}"
    sandbox.refused(
        client, sec, expect, tag=tag, requests=requests, url=url, dest=f"h/{tag}", **kwargs
    )
    assert not (sandbox.root / "h" / tag).exists()
