"""Input files for `downloads submit -i FILE`: one download a line, read as a stream so that a
file of any length is submitted in flat memory.

    URL [DEST] [SHA256]                       whitespace-separated, as wget's and aria2's lists
    {"url": ..., "dest": ..., "headers": ...}  a JSON object of the task's keyword arguments

Blank lines and lines starting with `#` are skipped. Each line is checked as the worker would
(download_client.arguments) when it is read; the first bad one stops the reading.

Id files for `wait`, `cancel` and `result -i FILE`: the first field of each line is the id, so
what `submit` prints (`ID  URL`, or the ids alone with `--ids`) is read back as it is."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from download_client import arguments
from download_client.errors import PermanentError

_ID = re.compile(r"[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}")  # a UUID, as Celery's


class InputError(ValueError):
    """A line of an input file that is not a download; the message names the file and line."""

    def __init__(self, source: str, line: int, reason: str) -> None:
        super().__init__(f"{source}, line {line}: {reason}")
        self.source, self.line = source, line


def read_downloads(
    lines: Iterable[str], source: str, defaults: Mapping[str, Any]
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, the task's keyword arguments) for each download in `lines`, checked.
    `defaults` (headers, max_bytes from the command line) apply where a line gives none; a
    line's own headers are added to the default ones."""
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            given = _json_line(text) if text.startswith("{") else _plain_line(text)
            kwargs = _with_defaults(given, defaults)
            arguments.parse((), kwargs, now=time.time())
        except (PermanentError, ValueError) as exc:
            raise InputError(source, number, str(exc)) from None
        yield number, kwargs


def _plain_line(text: str) -> dict[str, Any]:
    fields = text.split()
    if len(fields) > 3:
        raise ValueError(f"expected URL [DEST] [SHA256], got {len(fields)} fields")
    return dict(zip(("url", "dest", "sha256"), fields, strict=False))


def _json_line(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"not a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


def _with_defaults(given: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    merged = {**{k: v for k, v in defaults.items() if v not in (None, {})}, **given}
    if defaults.get("headers") and isinstance(given.get("headers"), dict):
        merged["headers"] = {**defaults["headers"], **given["headers"]}
    return merged


def read_ids(lines: Iterable[str], source: str) -> Iterator[str]:
    """The id of each line: its first whitespace-separated field (the rest, such as the URL that
    `submit` prints beside it, is ignored). Blank lines and `#` lines are skipped; a first field
    that is not an id raises InputError naming the line."""
    for number, line in enumerate(lines, 1):
        fields = line.split(None, 1)
        if not fields or fields[0].startswith("#"):
            continue
        if not _ID.fullmatch(fields[0]):
            shown = fields[0] if len(fields[0]) <= 60 else fields[0][:57] + "..."
            raise InputError(source, number, f"{shown!r} is not a download id (a UUID)")
        yield fields[0]
