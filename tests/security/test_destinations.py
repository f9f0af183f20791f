"""Destinations stay inside DOWNLOAD_DIR (end to end)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from tests.conftest import run, submit
from tests.harness import Worker, wait_for
from tests.security.conftest import Sandbox, mark

DESTS: list[tuple[str, Any, str]] = [
    ("absolute", "/tmp/escaped-{tag}", "not absolute"),
    ("dotdot", "../outside/{tag}", "'..' is not allowed"),
    ("dotdot-inner", "a/../../outside/{tag}", "'..' is not allowed"),
    ("dot", "./{tag}", "'.' is not allowed"),
    ("empty-component", "a//{tag}", "'' is not allowed"),
    ("nul", "a\x00{tag}", "NUL byte"),
    ("control", "a\n{tag}", "control characters"),
    ("long-name", "n" * 256, "longer than 255 bytes"),
    ("long-path", "/".join(["d" * 200] * 6), "longer than 1024 bytes"),
    ("partial-area", ".partial/{tag}.part", ".partial/ is the in-progress area"),
    ("surrogate", "a\udc80{tag}", "lone surrogate"),
    ("empty", "", "must not be empty"),
    ("trailing-slash", "dir-{tag}/", "not a directory"),
    ("not-str", ["a"], "dest: expected a string"),
    # Found by the no-follow walk before connecting; publish walks again (see the swap below).
    ("planted-symlink", "link/{tag}", "is a symlink or a file"),  # root/link -> outside/
    ("under-a-file", "file/{tag}", "is a symlink or a file"),
    ("existing-directory", "adir", "is an existing directory"),
]


@pytest.mark.parametrize(("dest", "expect"), [d[1:] for d in DESTS], ids=[d[0] for d in DESTS])
def test_bad_destination_refused_before_connecting(
    client: Celery, sec: Worker, sandbox: Sandbox, dest: Any, expect: str
) -> None:
    tag = mark()
    if isinstance(dest, str):
        dest = dest.format(tag=tag)
    url = f"{sandbox.origin.url}/bytes/10?m={tag}"
    sandbox.refused(client, sec, expect, tag=tag, requests=0, url=url, dest=dest)
    assert not Path(f"/tmp/escaped-{tag}").exists()


def test_final_symlink_is_replaced_not_followed(
    client: Celery, sec: Worker, sandbox: Sandbox
) -> None:
    """A symlink planted at the destination itself is replaced by the file (rename does not
    follow), so the file it pointed to outside is untouched."""
    tag = mark()
    victim = sandbox.base / f"victim-{tag}"
    victim.write_bytes(b"precious\n")
    (sandbox.root / f"planted-{tag}").symlink_to(victim)
    sandbox.baseline.add(victim.name)
    done = run(client, sec, url=f"{sandbox.origin.url}/bytes/1000?m={tag}", dest=f"planted-{tag}")
    assert done["size"] == 1000
    assert victim.read_bytes() == b"precious\n"
    assert not (sandbox.root / f"planted-{tag}").is_symlink()
    sandbox.assert_contained()


def test_directory_swapped_for_a_symlink_mid_download(
    client: Celery, sec: Worker, sandbox: Sandbox
) -> None:
    """The check-then-write race: a directory on the path becomes a symlink to outside/ while the
    body streams into .partial/. The publish walk opens each directory with O_NOFOLLOW, so it
    fails instead of following; nothing reaches outside/ and the partial is removed."""
    tag = mark()
    swap = sandbox.root / f"swap-{tag}"
    swap.mkdir()
    res = submit(
        client,
        sec,
        url=f"{sandbox.origin.url}/bytes/400000?rate=400000&m={tag}",
        dest=f"swap-{tag}/file.bin",
    )
    wait_for(lambda: any(p.stat().st_size for p in sandbox.parts()), 30, "bytes in .partial")
    swap.rename(sandbox.root / f"swapped-{tag}")
    swap.symlink_to(sandbox.outside)
    with pytest.raises(Exception, match="is a symlink or a file"):
        res.get(timeout=30)
    assert sandbox.requests(tag) == 1
    sandbox.assert_contained()
    sandbox.serves(client, sec)
