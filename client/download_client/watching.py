"""Waiting on downloads from the command line (`submit --wait` and `wait`): the live view on a
terminal, nothing but the summary elsewhere, a warning when no worker will ever take them, and
Ctrl-C that leaves them running and says how to follow them."""

from __future__ import annotations

import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from celery import Celery
from celery.result import AsyncResult
from rich.console import Console

from download_client import fleet, records, tables
from download_client.client import DONE_STATES, backend_redis, read_states, wait
from download_client.live import LiveView
from download_client.records import RetryNote

EXIT_OK, EXIT_FAILED, EXIT_TIMEOUT, EXIT_INTERRUPTED = 0, 1, 4, 130
NOBODY_AFTER = 3.0  # seconds of nothing leaving PENDING before asking who consumes the queue
HINT_IDS = 20  # more pending ids than this go to a file rather than onto the command line


class Interrupted(Exception):
    """Ctrl-C while waiting: the downloads go on; `pending` are those not finished."""

    def __init__(self, pending: list[str]) -> None:
        super().__init__(f"{len(pending)} downloads not finished")
        self.pending = pending


class NobodyWarning:
    """Once, after a few seconds in which no download left PENDING: ask the workers which
    queues they consume (in a thread, so the view keeps moving) and say so if none takes
    `queue` (None: if no worker is online at all)."""

    def __init__(self, app: Celery, queue: str | None, say: Callable[[str], None]) -> None:
        self.app, self.queue, self.say = app, queue, say
        self.started = time.monotonic()
        self.asked = False

    def poll(self, states: dict[str, str]) -> None:
        if self.asked or time.monotonic() - self.started < NOBODY_AFTER:
            return
        self.asked = True
        if all(s == "PENDING" for s in states.values()):
            threading.Thread(target=self._ask, name="who-consumes", daemon=True).start()

    def _ask(self) -> None:
        try:
            names = fleet.consumers(self.app, self.queue)
        except Exception:  # a warning is a courtesy: the wait itself reports real trouble
            return
        if names:
            return
        where = f"queue {self.queue!r}" if self.queue else "any queue"
        self.say(
            f"warning: no worker consumes {where} (none answered within "
            f"{fleet.INSPECT_TIMEOUT:g} s); the downloads wait there until one starts. "
            "Still waiting (Ctrl-C leaves them queued)."
        )


def watch(
    app: Celery,
    urls: dict[str, str | None],
    out: TextIO,
    as_json: bool,
    timeout: float | None,
    queue: str | None,
) -> int:
    """Wait for the downloads in `urls` (id -> redacted URL) and print the summary; the exit
    code says how they ended (Interrupted on Ctrl-C)."""
    results = [AsyncResult(rid, app=app) for rid in urls]
    states = {rid: "PENDING" for rid in urls}
    client = backend_redis(app)
    read_notes = _notes_reader(client)
    terminal = not as_json and out.isatty()
    console = Console(file=out) if terminal else None
    try:
        if console is not None:
            with LiveView(urls, console, read_notes) as view:
                nobody = NobodyWarning(app, queue, view.say)

                def poll() -> None:
                    view.poll()
                    nobody.poll(states)

                wait(
                    results,
                    timeout=timeout,
                    on_update=_both(view.update, states),
                    on_poll=poll,
                )
        else:
            nobody = NobodyWarning(app, queue, _to_stderr)
            wait(
                results,
                timeout=timeout,
                on_update=_both(None, states),
                on_poll=lambda: nobody.poll(states),
            )
    except KeyboardInterrupt:
        raise Interrupted([r for r, s in states.items() if s not in DONE_STATES]) from None
    rows = current_rows(app, list(urls), urls, read_notes)
    if as_json:
        tables.write_json(rows, out)
    elif console is not None:
        tables.write_rich(rows, console, time.time())
    else:
        tables.write_plain(rows, out, time.time())
    code = exit_code(rows)
    if code == EXIT_TIMEOUT and timeout is not None:
        pending = [r["id"] for r in rows if r["state"] not in tables.FINAL_STATES]
        follow_hint(pending, sys.stderr, f"timed out after {timeout:g} s")
    return code


def current_rows(
    app: Celery,
    ids: Sequence[str],
    urls: dict[str, str | None],
    read_notes: Callable[[Sequence[str]], dict[str, RetryNote]],
) -> list[dict[str, Any]]:
    states = read_states(app.backend, ids)
    notes = read_notes([i for i in ids if states[i][0] == "RETRY"])
    return [tables.row(i, urls.get(i), *states[i], note=notes.get(i)) for i in ids]


def exit_code(rows: list[dict[str, Any]]) -> int:
    if any(r["state"] not in tables.FINAL_STATES and r["state"] != tables.UNKNOWN for r in rows):
        return EXIT_TIMEOUT
    return EXIT_OK if all(r["state"] == "SUCCESS" for r in rows) else EXIT_FAILED


def follow_hint(pending: list[str], err: TextIO, why: str = "interrupted") -> None:
    """What Ctrl-C or the end of --timeout prints: the downloads go on, and the command that
    waits for them again (the ids in a file when there are many)."""
    some = f"{len(pending)} download{'s' if len(pending) != 1 else ''}"
    err.write(f"\n{why}: {some} not finished go on without this command.\n")
    if not pending:
        return
    if len(pending) <= HINT_IDS:
        err.write(f"follow them with: downloads wait {' '.join(pending)}\n")
        return
    with tempfile.NamedTemporaryFile(
        "w", prefix="downloads-", suffix=".ids", delete=False
    ) as saved:
        saved.writelines(f"{rid}\n" for rid in pending)
    err.write(f"their ids are in {saved.name}; follow them with: downloads wait -i {saved.name}\n")


def _both(
    view: Callable[[AsyncResult, str, Any], None] | None, states: dict[str, str]
) -> Callable[[AsyncResult, str, Any], None]:
    def update(result: AsyncResult, state: str, info: Any) -> None:
        states[result.id] = state
        if view is not None:
            view(result, state, info)

    return update


def _notes_reader(client: Any) -> Callable[[Sequence[str]], dict[str, RetryNote]]:
    if client is None:
        return lambda ids: {}
    return lambda ids: records.retry_notes(client, ids) if ids else {}


def _to_stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
