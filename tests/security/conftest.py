"""End to end: the sandbox and the workers every security test uses.

Every hostile case asserts the same four things (`Sandbox.refused`): the task FAILED with a message
naming the argument or the cause; the origin saw exactly the requests expected (none when the
refusal must come before any connection, one when a retry cannot help); nothing exists outside
DOWNLOAD_DIR and no `*.part` is left in `.partial/`; and the worker then serves a normal download.
Nothing here connects to anything but the loopback origin(s)."""

from __future__ import annotations

import hashlib
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.conftest import failure, run
from tests.harness import Worker
from tests.server import OriginServer, body_sha256

READY_DEST = "ok/ready.bin"


def mark() -> str:
    return uuid.uuid4().hex[:12]


def entries(base: Path, skip: Path | None = None) -> set[str]:
    """Every path under `base` (symlinks not followed), minus the subtree `skip`."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(base):
        here = Path(dirpath)
        if skip is not None and here == skip:
            dirnames.clear()
            continue
        for name in dirnames + filenames:
            if skip is not None and here / name == skip:
                continue
            found.add(str((here / name).relative_to(base)))
    return found


class Sandbox:
    """base/ holds DOWNLOAD_DIR (root/) and outside/, the place symlinks point to."""

    def __init__(self, base: Path, origin: OriginServer) -> None:
        self.base, self.origin = base, origin
        self.root = base / "downloads"
        self.outside = base / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        (self.root / "ok").mkdir()
        (self.root / READY_DEST).write_bytes(b"ready\n")
        (self.root / "link").symlink_to(self.outside)  # a directory symlink leading out
        (self.root / "file").write_bytes(b"a file, not a directory\n")
        (self.root / "adir").mkdir()
        self.baseline = entries(base, skip=self.root)

    def requests(self, tag: str) -> int:
        with self.origin.stats.lock:
            return sum(1 for r in self.origin.stats.requests if r.query.get("m") == tag)

    def parts(self) -> list[Path]:
        return sorted((self.root / ".partial").glob("*.part"))

    def assert_contained(self, parts_before: list[Path] | None = None) -> None:
        assert entries(self.base, skip=self.root) == self.baseline, "something left the root"
        assert not any(self.outside.iterdir()), "something was written through a symlink"
        new = set(self.parts()) - set(parts_before or [])
        assert not new, f"a partial download was left behind: {new}"

    def serves(self, client: Celery, worker: Worker) -> None:
        """The worker still completes a normal task afterwards."""
        if worker.env["DOWNLOAD_ALLOW_PRIVATE"] == "false":
            # Nothing on loopback may be fetched: a sha256 that already matches needs no network.
            done = run(
                client,
                worker,
                url=f"{self.origin.url}/never",
                dest=READY_DEST,
                sha256=hashlib.sha256(b"ready\n").hexdigest(),
            )
            assert done["skipped"] is True
            return
        tag = mark()
        done = run(client, worker, url=f"{self.origin.url}/bytes/5000?m={tag}", dest=f"ok/{tag}")
        assert done["sha256"] == body_sha256(5000)

    def refused(
        self,
        client: Celery,
        worker: Worker,
        expect: str,
        tag: str | None = None,
        requests: int = 0,
        **kwargs: Any,
    ) -> str:
        parts = self.parts()
        state, message = failure(client, worker, **kwargs)
        assert state == "FAILURE"
        assert expect in message, message
        if tag is not None:
            assert self.requests(tag) == requests, f"origin saw {self.requests(tag)} requests"
        self.assert_contained(parts)
        self.serves(client, worker)
        return message


@pytest.fixture(scope="package")
def sandbox(tmp_path_factory: pytest.TempPathFactory, origin: OriginServer) -> Sandbox:
    return Sandbox(tmp_path_factory.mktemp("security"), origin)


@pytest.fixture(scope="package")
def sec(start_worker: Callable[..., Worker], sandbox: Sandbox) -> Worker:
    """Loopback allowed (the origin is there), one retry, short read timeout, a 4 MB cap."""
    return start_worker(
        download_dir=sandbox.root,
        DOWNLOAD_MAX_RETRIES="1",
        DOWNLOAD_READ_TIMEOUT="1",
        DOWNLOAD_MAX_BYTES="4000000",
    )


@pytest.fixture(scope="package")
def ssrf(start_worker: Callable[..., Worker], sandbox: Sandbox) -> Worker:
    """The default: internal addresses refused."""
    return start_worker(download_dir=sandbox.root, DOWNLOAD_ALLOW_PRIVATE="false")


@pytest.fixture(scope="package")
def origin6() -> Iterator[OriginServer]:
    try:
        server = OriginServer(host="::1", family=socket.AF_INET6).start()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    yield server
    server.stop()
