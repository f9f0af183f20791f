"""Property-based: whatever path a caller sends, tasks.core.storage never writes
outside the root, with symlinks planted in the root beforehand or swapped in mid-download."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from download_client.errors import PermanentError
from tasks.core.storage import Target

COMPONENTS = st.sampled_from(
    [
        "..",
        ".",
        "",
        "a",
        "b",
        "link",  # -> outside/
        "file",  # a regular file
        "adir",  # a directory holding link2 -> outside/
        "link2",
        "slash",  # -> /
        "self",  # -> . (the root itself)
        ".partial",
        "n" * 256,
        "nul\x00",
        "é",
        "\udc80",
    ]
) | st.text(max_size=12)
PATHS = st.tuples(st.sampled_from(["", "/", "./", "../"]), st.lists(COMPONENTS, max_size=6)).map(
    lambda t: t[0] + "/".join(t[1])
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextmanager
def planted() -> Iterator[tuple[Path, Path, Path]]:
    """base/ with root/ (symlinks and a file planted in it) and outside/ (must stay empty)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        root, outside = base / "root", base / "outside"
        root.mkdir()
        outside.mkdir()
        (root / "link").symlink_to(outside)
        (root / "file").write_bytes(b"file\n")
        (root / "adir").mkdir()
        (root / "adir" / "link2").symlink_to(outside)
        (root / "slash").symlink_to("/")
        (root / "self").symlink_to(".")
        yield base, root, outside


def outside_untouched(base: Path, outside: Path) -> None:
    assert sorted(p.name for p in base.iterdir()) == ["outside", "root"]
    assert list(outside.iterdir()) == []


def write(root: Path, dest: str) -> Target:
    target = Target(root, dest, "http://example.invalid/x")
    with target.locked():
        target.check_path()
        f, _ = target.open_partial(0)
        f.write(b"body")
        target.publish(f)
    return target


@SETTINGS
@given(PATHS)
def test_no_path_writes_outside_the_root(dest: str) -> None:
    with planted() as (base, root, outside):
        try:
            target = write(root, dest)
        except PermanentError:
            pass
        else:
            final = root / str(target.dest)
            assert not final.is_symlink() and final.read_bytes() == b"body"
            assert os.path.realpath(final).startswith(os.path.realpath(root) + os.sep)
        outside_untouched(base, outside)


@SETTINGS
@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=4), st.data())
def test_directory_swapped_for_a_symlink_before_publish(
    dirs: list[str], data: st.DataObject
) -> None:
    """The race: the body is in .partial/ and a directory on the way is replaced by a symlink
    to outside/ (or to /) just before the rename. The O_NOFOLLOW walk refuses it."""
    swap = data.draw(st.integers(0, len(dirs) - 1))
    to_root = data.draw(st.booleans())
    with planted() as (base, root, outside):
        dest = "/".join([*dirs, "file.bin"])
        (root / Path(*dirs)).mkdir(parents=True)
        target = Target(root, dest, "http://example.invalid/x")
        with target.locked():
            target.check_path()
            f, _ = target.open_partial(0)
            f.write(b"body")
            victim = root / Path(*dirs[: swap + 1])
            victim.rename(victim.with_name(victim.name + ".moved"))
            victim.symlink_to("/" if to_root else outside)
            try:
                target.publish(f)
            except PermanentError as exc:
                assert "is a symlink or a file" in str(exc)
            else:
                raise AssertionError("published through a symlink")
        outside_untouched(base, outside)
