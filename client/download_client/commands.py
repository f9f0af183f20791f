"""The `downloads` subcommands: each takes the parsed arguments and an output stream and
returns the exit code (download_client.cli parses and dispatches)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from typing import Any, TextIO

from rich.console import Console

from download_client import arguments, fleet, records, tables, watching
from download_client.client import (
    DONE_STATES,
    backend_redis,
    cancel,
    connect,
    read_states,
    route,
    submit_stream,
)
from download_client.errors import PermanentError
from download_client.inputs import InputError, read_downloads, read_ids
from download_client.tables import UNKNOWN

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
PROGRESS_EVERY = 1000  # submissions between two updates of the progress line


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def submit(args: argparse.Namespace, out: TextIO) -> int:
    downloads: Iterable[dict[str, Any]] = _downloads(args)
    with ExitStack() as stack:
        if args.input is not None:
            lines = sys.stdin if args.input == "-" else stack.enter_context(_open(args.input))
            source = "standard input" if args.input == "-" else args.input
            downloads = _Lines(read_downloads(lines, source, _defaults(args)))
        return _submit(args, downloads, out)


def _submit(args: argparse.Namespace, downloads: Iterable[dict[str, Any]], out: TextIO) -> int:
    app = connect()
    counter = _Counter(_expected(args), sys.stderr)
    urls: dict[str, str | None] = {}  # kept for --wait only: a plain submission streams
    listing = _Listing(out, args.json, args.ids) if not args.wait else None
    try:
        # Task-sent events for the command line's few; a file's thousands would double the
        # publishing and flood every event consumer (Flower lists them once a worker takes them).
        announce = args.input is None
        queue = route(app, args.queue, args.urgent)
        for task_id, shown in submit_stream(app, downloads, queue, announce):
            counter.step()
            if listing is not None:
                listing.add(task_id, shown)
            else:
                urls[task_id] = shown
    except KeyboardInterrupt:
        counter.finish()
        print(f"\ninterrupted: {counter.done} downloads were queued", file=sys.stderr)
        return watching.EXIT_INTERRUPTED
    finally:
        if listing is not None:
            listing.close()
    counter.finish()
    if isinstance(downloads, _Lines) and downloads.error is not None:
        last = f" up to line {downloads.last_line}" if downloads.last_line else ""
        print(
            f"error: {downloads.error}; the {counter.done} downloads{last} were queued, "
            "nothing after it",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if listing is not None:
        return EXIT_OK
    return _watch(app, urls, args, out, queue=args.queue or app.conf.task_default_queue)


def _downloads(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The command line's downloads, each checked as the worker would before anything is sent
    (an input file's lines are checked as they are read)."""
    if args.ids and (args.wait or args.json):
        raise UsageError("--ids prints the ids as they are queued: not with --wait or --json")
    if args.input is not None:
        if args.urls or args.dest or args.sha256 or args.mirror:
            raise UsageError("-i takes the URLs (and destinations, checksums) from the file")
        return []
    if not args.urls:
        raise UsageError("give one or more URLs, or -i FILE")
    if len(args.urls) > 1 and (args.dest or args.sha256 or args.mirror):
        raise UsageError("--dest, --sha256 and --mirror name one file: give one URL with them")
    defaults = _defaults(args)
    given = {"dest": args.dest, "sha256": args.sha256, "mirrors": args.mirror}
    downloads = [
        {**defaults, "url": url, **{k: v for k, v in given.items() if v}} for url in args.urls
    ]
    for kwargs in downloads:
        try:
            arguments.parse((), kwargs, now=time.time())
        except PermanentError as exc:
            raise UsageError(str(exc)) from None
    return downloads


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    defaults: dict[str, Any] = {"headers": _headers(args.header)}
    if args.max_bytes is not None:
        defaults["max_bytes"] = args.max_bytes
    if args.deadline is not None:
        defaults["deadline"] = _deadline(args.deadline)
    if args.group is not None:
        defaults["group"] = args.group
    return defaults


def _deadline(given: str) -> float | str:
    """--deadline's text: seconds when it is a number, else the time as given."""
    try:
        return float(given)
    except ValueError:
        return given


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for n, pair in enumerate(pairs, 1):
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():  # not echoed: it may be a credential missing its colon
            raise UsageError(f"--header number {n}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return headers


def _open(path: str) -> TextIO:
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None


def _expected(args: argparse.Namespace) -> int | None:
    """How many downloads a regular input file holds (a quick streaming count, for the progress
    line); None for standard input, which can be read only once."""
    if args.input is None:
        return len(args.urls)
    if args.input == "-":
        return None
    with _open(args.input) as lines:
        return sum(1 for line in lines if line.strip() and not line.lstrip().startswith("#"))


class _Lines:
    """An input file's downloads, up to its first bad line: what comes before it is still
    submitted, then the error is reported with the number of the last good line."""

    def __init__(self, lines: Iterator[tuple[int, dict[str, Any]]]) -> None:
        self.lines = lines
        self.error: InputError | None = None
        self.last_line = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            for number, kwargs in self.lines:
                self.last_line = number
                yield kwargs
        except InputError as exc:
            self.error = exc


class _Counter:
    """`submitted 12000/200000` on standard error while submitting, redrawn in place on a
    terminal; elsewhere only the final count."""

    def __init__(self, expected: int | None, err: TextIO) -> None:
        self.expected, self.err, self.done = expected, err, 0
        self.live = err.isatty()

    def step(self) -> None:
        self.done += 1
        if self.live and self.done % PROGRESS_EVERY == 0:
            self.err.write(f"\rsubmitted {self.done}/{self.expected or '…'}")
            self.err.flush()

    def finish(self) -> None:
        if self.live and self.done >= PROGRESS_EVERY:
            self.err.write(f"\rsubmitted {self.done}/{self.expected or self.done}\n")
        elif not self.live and self.done >= PROGRESS_EVERY:
            self.err.write(f"submitted {self.done}\n")


class _Listing:
    """Without --wait: each id and URL as soon as it is queued (JSON: one array, written as it
    grows; --ids: the id alone), so nothing of a long input file is held in memory."""

    def __init__(self, out: TextIO, as_json: bool, ids_only: bool = False) -> None:
        self.out, self.as_json, self.ids_only, self.count = out, as_json, ids_only, 0
        if as_json:
            out.write("[")

    def add(self, task_id: str, url: str) -> None:
        if self.as_json:
            sep = ", " if self.count else ""
            self.out.write(sep + json.dumps({"id": task_id, "url": url}))
        elif self.ids_only:
            self.out.write(f"{task_id}\n")
        else:
            self.out.write(f"{task_id}  {url}\n")
        self.count += 1

    def close(self) -> None:
        if self.as_json:
            self.out.write("]\n")
        self.out.flush()


def wait_for(args: argparse.Namespace, out: TextIO) -> int:
    ids = _ids(args)
    app = connect()
    known = _known(app, ids)
    unknown = [i for i in ids if i not in known]
    for task_id in unknown:
        print(f"{task_id}: unknown (no download with this id is known here)", file=sys.stderr)
    if not known:
        return EXIT_FAILED
    code = _watch(app, known, args, out, queue=None)
    return EXIT_FAILED if unknown and code == EXIT_OK else code


def _watch(
    app: Any, urls: dict[str, str | None], args: argparse.Namespace, out: TextIO, queue: str | None
) -> int:
    try:
        return watching.watch(app, urls, out, args.json, args.timeout, queue)
    except watching.Interrupted as stop:
        watching.follow_hint(stop.pending, sys.stderr)
        return watching.EXIT_INTERRUPTED


def _ids(args: argparse.Namespace) -> list[str]:
    """The ids of the command line, then those of -i FILE (the first field of each line: what
    `submit` prints, with or without --ids)."""
    ids = list(args.ids)
    if args.input is not None:
        with ExitStack() as stack:
            lines = sys.stdin if args.input == "-" else stack.enter_context(_open(args.input))
            source = "standard input" if args.input == "-" else args.input
            ids += read_ids(lines, source)
    if not ids:
        raise UsageError("give one or more ids")
    return list(dict.fromkeys(ids))  # each once, in order


def _known(app: Any, ids: list[str]) -> dict[str, str | None]:
    """The ids something is known about, with their URL where known: submitted through this
    client (a record), or with a state in the result backend (any producer's, once a worker
    has taken it)."""
    client = backend_redis(app)
    recorded = records.submitted(client, ids) if client is not None else {}
    states = read_states(app.backend, ids)
    known: dict[str, str | None] = {}
    for task_id in ids:
        if task_id in recorded or states[task_id][0] != "PENDING" or client is None:
            known[task_id] = recorded.get(task_id)
    return known


def results(args: argparse.Namespace, out: TextIO) -> int:
    ids = _ids(args)
    app = connect()
    known = _known(app, ids)
    client = backend_redis(app)
    reader = (lambda some: records.retry_notes(client, some)) if client is not None else None
    rows = watching.current_rows(app, ids, known, reader or (lambda some: {}))
    rows = [r if r["id"] in known else {**r, "state": UNKNOWN} for r in rows]
    if args.json:
        tables.write_json(rows, out)
    elif out.isatty():
        tables.write_rich(rows, Console(file=out), time.time())
    else:
        tables.write_plain(rows, out, time.time())
    return EXIT_OK if all(r["state"] == "SUCCESS" for r in rows) else EXIT_FAILED


def cancel_ids(args: argparse.Namespace, out: TextIO) -> int:
    ids = _ids(args)
    app = connect()
    known = _known(app, ids)
    states = read_states(app.backend, ids)
    to_cancel = [i for i in ids if i in known and states[i][0] not in DONE_STATES]
    workers = cancel(app, to_cancel) if to_cancel else []
    if to_cancel and not workers:
        print("error: no worker answered: nothing was cancelled", file=sys.stderr)
        return EXIT_UNREACHABLE
    rows = []
    for task_id in ids:
        state = states[task_id][0] if task_id in known else UNKNOWN
        rows.append({"id": task_id, "was": state, "cancelled": task_id in to_cancel})
    if args.json:
        tables.write_json(rows, out)
    else:
        for r in rows:
            out.write(f"{r['id']}  {_cancel_text(r)}\n")
    return EXIT_FAILED if any(r["was"] == UNKNOWN for r in rows) else EXIT_OK


def _cancel_text(r: dict[str, Any]) -> str:
    if r["cancelled"]:
        return f"cancelled (was {r['was']})"
    if r["was"] == UNKNOWN:
        return "unknown: no download with this id is known here"
    return f"already {r['was']}: nothing to cancel"


def status(args: argparse.Namespace, out: TextIO) -> int:
    app = connect()
    body = fleet.status(app, args.queue)
    if args.json:
        json.dump(body, out)
        out.write("\n")
    else:
        _write_status(body, out)
    return EXIT_OK if body["workers"] else EXIT_UNREACHABLE


def _write_status(body: dict[str, Any], out: TextIO) -> None:
    out.write(f"workers online: {len(body['workers'])}\n")
    for w in body["workers"]:
        out.write(f"  {w}\n")
    out.write(f"queue {body['queue']!r}: {body['queue_depth']} queued\n")
    if len(body["groups"]) > 1:
        for group, n in body["groups"].items():
            out.write(f"  group {group}: {n['queued']} queued, {n['parked']} parked, "
                      f"{n['running']} running\n")  # fmt: skip
    retrying = body["retrying"]
    out.write(f"active downloads: {len(body['active'])}\n")
    for d in body["active"]:
        progress = d["progress"] or {}
        figures = tables.size(progress.get("bytes") or 0) if progress else ""
        if progress.get("total"):
            figures += f" of {tables.size(progress['total'])}"
        out.write(f"  {d['id']}  {d['worker']}  {figures}  {d['kwargs']}\n")
    w = body["waiting"]
    out.write(
        f"waiting: {w['queued']} queued, {w['origin']} parked for an origin slot, "
        f"{w['destination']} waiting for a busy destination\n"
    )
    for origin, n in w["origins"].items():
        out.write(f"  {n} parked for a slot at {origin}\n")
    for d in w["destinations"]:
        out.write(f"  {d['id']}  {d['worker'] or ''}  waiting for {d['dest']}\n")
    out.write(f"waiting to retry: {len(retrying)}\n")
    now = time.time()
    for r in retrying:
        out.write(f"  {r['id']}  {r['worker'] or ''}  {tables.retry_text(r, now)}\n")
    _write_bandwidth(body.get("bandwidth") or {}, out)
    _write_disks(body.get("disks") or {}, out)


def _write_disks(volumes: dict[str, dict[str, Any]], out: TextIO) -> None:
    """One line per volume with disk reservations: what is reserved and by how many, how many
    wait for room, and the volume's free space and margin as last measured."""
    if not volumes:
        return
    out.write("disk reservations:\n")
    for name, v in volumes.items():
        out.write(f"  {name} ({v.get('path')} on {v.get('host')}): "
                  f"{tables.size(v.get('reserved', 0))} reserved by {v.get('holders', 0)}, "
                  f"{v.get('waiting', 0)} waiting for room; {tables.size(v.get('free', 0))} "
                  f"free, {tables.size(v.get('margin', 0))} kept free\n")  # fmt: skip


def _write_bandwidth(rates: dict[str, dict[str, float]], out: TextIO) -> None:
    """One line per bandwidth budget used so far: its rate, the bytes through it, and whether
    it holds downloads back now (its clock runs ahead of now by more than its tolerance)."""
    if not rates:
        return
    out.write("bandwidth budgets:\n")
    for scope, r in rates.items():
        ahead = r.get("ahead_s", 0.0)
        now = "not holding any back now"
        if ahead > records.RATE_TOLERANCE_S:
            now = f"holding downloads back ({ahead:.1f} s booked ahead)"
        out.write(f"  {scope}: {tables.size(r.get('rate', 0))}/s, "
                  f"{tables.size(r.get('bytes', 0))} so far, {now}\n")  # fmt: skip
