"""`downloads` (or `python -m download_client.cli`): submit downloads, watch them, see the
fleet's status.

Exit codes: 0 all succeeded (or were queued, without --wait); 1 one or more downloads failed;
2 bad usage; 3 the broker or the workers could not be reached; 4 --wait timed out.
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import time
from typing import Any, TextIO

from celery.result import AsyncResult
from kombu.exceptions import OperationalError
from redis.exceptions import RedisError

from download_client import arguments
from download_client.client import RUNNING_STATES as RUNNING
from download_client.client import BatchProgress, connect, submit, wait
from download_client.contract import TASK_NAME
from download_client.errors import PermanentError
from download_client.redact import redact_url
from download_client.settings import SettingsError

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="downloads", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="queue downloads (and wait for them with --wait)")
    s.add_argument("urls", nargs="+", metavar="URL")
    s.add_argument("--dest", help="destination under DOWNLOAD_DIR (one URL only)")
    s.add_argument("--sha256", help="expected sha256 (one URL only)")
    s.add_argument("--max-bytes", type=int, help="size cap for each download")
    s.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME:VALUE",
        help="extra request header (repeatable)",
    )
    s.add_argument("--queue", help="queue to send to (default: celery)")
    s.add_argument("--wait", action="store_true", help="wait, with progress, and summarise")
    s.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    s.add_argument("--json", action="store_true", help="print JSON for machines")
    st = sub.add_parser("status", help="workers, queue depth and active downloads")
    st.add_argument("--json", action="store_true", help="print JSON for machines")
    st.add_argument("--queue", default="celery", help="queue whose depth to show")
    r = sub.add_parser("result", help="state and result of downloads by id")
    r.add_argument("ids", nargs="+", metavar="ID")
    r.add_argument("--json", action="store_true", help="print JSON for machines")
    return parser


class UsageError(Exception):
    """Bad arguments: exit code 2."""


def main(argv: list[str] | None = None, out: TextIO = sys.stdout) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "submit":
            return _submit(args, out)
        if args.command == "status":
            return _status(args, out)
        return _results(args, out)
    except (UsageError, SettingsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (OperationalError, RedisError) as exc:
        print(f"error: cannot reach the broker or the result backend: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _headers(pairs: list[str]) -> dict[str, str]:
    headers = {}
    for n, pair in enumerate(pairs, 1):
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():  # not echoed: it may be a credential missing its colon
            raise UsageError(f"--header number {n}: expected NAME:VALUE")
        headers[name.strip()] = value.strip()
    return headers


def _task_kwargs(url: str, args: argparse.Namespace, headers: dict[str, str]) -> dict[str, Any]:
    given = {"dest": args.dest, "sha256": args.sha256, "max_bytes": args.max_bytes}
    return {"url": url, "headers": headers, **{k: v for k, v in given.items() if v is not None}}


def _submit(args: argparse.Namespace, out: TextIO) -> int:
    if len(args.urls) > 1 and (args.dest or args.sha256):
        raise UsageError("--dest and --sha256 name one file: give one URL with them")
    headers = _headers(args.header)
    for url in args.urls:  # the worker checks them too; a person wants to hear it now
        try:
            arguments.parse((), _task_kwargs(url, args, headers))
        except PermanentError as exc:
            raise UsageError(str(exc)) from None
    app = connect()
    results = [
        submit(
            app,
            url,
            dest=args.dest,
            sha256=args.sha256,
            headers=headers,
            max_bytes=args.max_bytes,
            queue=args.queue,
        )
        for url in args.urls
    ]
    urls = {r.id: redact_url(u) for r, u in zip(results, args.urls, strict=True)}
    if not args.wait:
        if args.json:
            json.dump([{"id": r.id, "url": urls[r.id]} for r in results], out)
            out.write("\n")
        else:
            for r in results:
                out.write(f"{r.id}  {urls[r.id]}\n")
        return EXIT_OK
    view = _ProgressView(urls, BatchProgress(results), out, live=not args.json and out.isatty())
    done = wait(results, timeout=args.timeout, on_update=view.update)
    rows = [_row(r, urls[r.id]) for r in done.values()]
    if args.json:
        json.dump(rows, out)
        out.write("\n")
    else:
        view.finish()
        _table(rows, out)
    if any(row["state"] not in ("SUCCESS", "FAILURE", "REVOKED") for row in rows):
        return EXIT_TIMEOUT
    return EXIT_OK if all(row["state"] == "SUCCESS" for row in rows) else EXIT_FAILED


def _row(result: AsyncResult, url: str | None) -> dict[str, Any]:
    state, info = result.state, result.info
    row: dict[str, Any] = {"id": result.id, "url": url, "state": state}
    if state == "SUCCESS" and isinstance(info, dict):
        row["result"] = info
    elif state in ("FAILURE", "REVOKED"):
        row["error"] = f"{type(info).__name__}: {info}" if info else state
    elif state == "PROGRESS" and isinstance(info, dict):
        row["progress"] = info
    return row


class _ProgressView:
    """On a terminal: one line per download and a line for the whole batch, redrawn in place
    (at most 10 times a second). Elsewhere nothing until the summary table."""

    def __init__(self, urls: dict[str, str], batch: BatchProgress, out: TextIO, live: bool) -> None:
        self.urls, self.batch, self.out, self.live = urls, batch, out, live
        self.lines: dict[str, str] = {rid: "PENDING" for rid in urls}
        self.drawn = 0
        self.last = 0.0

    def update(self, result: AsyncResult, state: str, info: Any) -> None:
        self.batch.update(result, state, info)
        if state == "PROGRESS" and isinstance(info, dict):
            self.lines[result.id] = _bar(info.get("bytes", 0), info.get("total"))
        elif state == "SUCCESS" and isinstance(info, dict):
            self.lines[result.id] = f"done {_size(info.get('size', 0))}"
        else:
            self.lines[result.id] = state
        if not self.live:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and state not in ("SUCCESS", "FAILURE"):
            return
        self.last = now
        self._draw()

    def _draw(self) -> None:
        if self.drawn:  # back to the first line drawn, and clear everything below it
            self.out.write(f"\x1b[{self.drawn}F\x1b[J")
        shown = list(self.lines.items())
        room = shutil.get_terminal_size().lines - 2
        if len(shown) > room:  # a line that scrolled away cannot be redrawn: running ones only
            running = [(rid, line) for rid, line in shown if self.batch.states[rid] in RUNNING]
            shown = running[: max(room, 0)]
        for rid, line in shown:
            self.out.write(f"{_short(self.urls[rid], 50):50}  {line}\n")
        self.out.write(f"{_batch_line(self.batch.summary())}\n")
        self.drawn = len(shown) + 1
        self.out.flush()

    def finish(self) -> None:
        if self.live:
            self._draw()


def _batch_line(s: dict[str, int]) -> str:
    return (
        f"{s['succeeded'] + s['failed']}/{s['total']} done ({s['succeeded']} succeeded, "
        f"{s['failed']} failed), {s['running']} running, {s['waiting']} waiting, "
        f"{_size(s['bytes'])}"
    )


def _bar(done: int, total: int | None, width: int = 24) -> str:
    if not total:
        return f"{_size(done)}"
    filled = int(width * min(done, total) / total)
    return f"[{'#' * filled}{'.' * (width - filled)}] {100 * done / total:5.1f}% {_size(done)}"


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def _table(rows: list[dict[str, Any]], out: TextIO) -> None:
    ok = [r for r in rows if r["state"] == "SUCCESS"]
    total = sum(r["result"]["size"] for r in ok)
    out.write(f"{'STATE':8}  {'SIZE':>10}  {'PATH / ERROR':40}  URL\n")
    for row in rows:
        if row["state"] == "SUCCESS":
            res = row["result"]
            detail = res["path"] + (" (skipped)" if res.get("skipped") else "")
            size = _size(res["size"])
        else:
            detail, size = row.get("error", row["state"]), ""
        out.write(f"{row['state']:8}  {size:>10}  {_short(detail, 40):40}  {row['url']}\n")
        if len(detail) > 40:  # an error is read whole: its cause is often at the end
            out.write(f"{'':10}  {detail}\n")
    out.write(f"{len(ok)} of {len(rows)} succeeded, {_size(total)}\n")


def _queue_depth(conn: Any, queue: str) -> int:
    """Messages waiting in `queue`, on Redis or RabbitMQ; a queue not declared yet holds none."""
    try:
        return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
    except conn.channel_errors:
        return 0


def _status(args: argparse.Namespace, out: TextIO) -> int:
    app = connect()
    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)
        depth = _queue_depth(conn, args.queue)
    # One broadcast: every worker that answers `active` is online (a ping would cost another
    # second of waiting for replies).
    active = app.control.inspect(timeout=1.0).active() or {}
    workers = sorted(active)
    downloads = [
        {"worker": w, "id": t["id"], "kwargs": _kwargs_object(t.get("kwargs"))}
        for w, tasks in active.items()
        for t in tasks
        if t.get("name") == TASK_NAME
    ]
    for d in downloads:  # bytes and total from the result backend, as pollers see them
        meta = app.backend.get_task_meta(d["id"])
        info = meta.get("result") if meta.get("status") == "PROGRESS" else None
        d["progress"] = info if isinstance(info, dict) else None
    status = {"workers": workers, "queue": args.queue, "queue_depth": depth, "active": downloads}
    if args.json:
        json.dump(status, out)
        out.write("\n")
    else:
        out.write(f"workers online: {len(workers)}\n")
        for w in workers:
            out.write(f"  {w}\n")
        out.write(f"queue {args.queue!r}: {depth} waiting\n")
        out.write(f"active downloads: {len(downloads)}\n")
        for d in downloads:
            progress = d["progress"] or {}
            figures = _bar(progress.get("bytes") or 0, progress.get("total")) if progress else ""
            out.write(f"  {d['id']}  {d['worker']}  {figures}  {d['kwargs']}\n")
    return EXIT_OK if workers else EXIT_UNREACHABLE


def _kwargs_object(shown: Any) -> Any:
    """The kwargs `inspect active` reports as the worker's redacted repr, as a JSON object (a
    Python literal, read without evaluating anything); the text itself if it is not one."""
    if not isinstance(shown, str):
        return shown
    try:
        value = ast.literal_eval(shown)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return shown
    return value if isinstance(value, dict) else shown


def _stored_row(result: AsyncResult) -> dict[str, Any]:
    """A row for an id alone: the URL is the result's own (redacted) one; a download that has
    not succeeded stores none, so it is null there."""
    info = result.info
    url = info.get("url") if result.state == "SUCCESS" and isinstance(info, dict) else None
    return _row(result, url)


def _results(args: argparse.Namespace, out: TextIO) -> int:
    app = connect()
    rows = [_stored_row(AsyncResult(i, app=app)) for i in args.ids]
    if args.json:
        json.dump(rows, out)
        out.write("\n")
    else:
        for row in rows:
            out.write(
                f"{row['id']}  {row['state']}  {row.get('result') or row.get('error') or ''}\n"
            )
    return EXIT_OK if all(r["state"] == "SUCCESS" for r in rows) else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
