"""The live view of `--wait` on a terminal, drawn with rich: a bar per running download (bytes,
speed, time left) and one for the batch, redrawn in place; a line above the bars for each
download that ends. Only what runs or waits to retry has a bar: a batch of thousands shows the
few that move."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.result import AsyncResult
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.text import Text

from download_client.client import DONE_STATES, RUNNING_STATES
from download_client.records import RetryNote
from download_client.tables import message, retry_of, retry_text, size

NotesReader = Callable[[Sequence[str]], dict[str, RetryNote]]
NOTES_EVERY = 1.0  # seconds between reads of the retry notes of downloads in RETRY


class _StatusColumn(ProgressColumn):
    """The state, or for a download waiting to retry, its reason and the time left until the
    next attempt (counted down at each redraw)."""

    def render(self, task: Task) -> Text:
        retry = task.fields.get("retry")
        if retry is not None:
            return Text("retry, " + retry_text(retry, time.time()), style="yellow")
        return Text(task.fields.get("status", ""))


@dataclass
class _Batch:
    """The batch's figures: bytes and totals of what is really transferred (a skipped download,
    already on disk, counts none of its bytes)."""

    states: dict[str, str]
    done_bytes: dict[str, int] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        states = list(self.states.values())
        ok, failed = states.count("SUCCESS"), states.count("FAILURE") + states.count("REVOKED")
        running = sum(s in RUNNING_STATES and s != "RETRY" for s in states)
        waiting = sum(s not in DONE_STATES and s not in RUNNING_STATES for s in states)
        retrying = states.count("RETRY")
        text = (
            f"{ok + failed}/{len(states)} done ({ok} succeeded, {failed} failed), "
            f"{running} running, {waiting} waiting"
        )
        return text + (f", {retrying} retrying" if retrying else "")


class LiveView:
    """Feed it with `wait(..., on_update=view.update, on_poll=view.poll)` inside `with view:`."""

    def __init__(self, urls: dict[str, str | None], console: Console, notes: NotesReader) -> None:
        self.urls, self.console, self.read_notes = urls, console, notes
        self.batch = _Batch({rid: "PENDING" for rid in urls})
        self.progress = Progress(
            TextColumn("{task.fields[label]}"),
            BarColumn(bar_width=30),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            _StatusColumn(),
            console=console,
            refresh_per_second=8,
        )
        self.bars: dict[str, TaskID] = {}
        self.total = self.progress.add_task("", total=None, label="batch", status="")
        self.notes_read = 0.0
        self._show_batch()

    def __enter__(self) -> LiveView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def say(self, text: str) -> None:
        """A line above the bars (a warning, a download that ended)."""
        self.progress.console.print(text, highlight=False)

    def update(self, result: AsyncResult, state: str, info: Any) -> None:
        rid = result.id
        self.batch.states[rid] = state
        if state in DONE_STATES:
            self._ended(rid, state, info)
        elif state in RUNNING_STATES:
            bar = self._bar(rid)
            if state == "PROGRESS" and isinstance(info, dict):
                done, total = int(info.get("bytes") or 0), info.get("total")
                self.batch.done_bytes[rid] = done
                if total:
                    self.batch.totals[rid] = int(total)
                self.progress.update(bar, completed=done, total=total, status="", retry=None)
            elif state == "RETRY":
                note = self.read_notes([rid]).get(rid)
                self.progress.update(bar, retry=retry_of(info, note))
            else:
                self.progress.update(bar, status=state.lower(), retry=None)
        self._show_batch()

    def poll(self) -> None:
        """Between two reads of the states: the retry notes of downloads in RETRY (a worker
        writes its note beside the state, so it may come a little later)."""
        now = time.monotonic()
        if now - self.notes_read < NOTES_EVERY:
            return
        self.notes_read = now
        retrying = [rid for rid, s in self.batch.states.items() if s == "RETRY"]
        if not retrying:
            return
        for rid, note in self.read_notes(retrying).items():
            if rid in self.bars:
                retry = {"reason": note.reason, "due": note.due, "attempt": note.attempt}
                self.progress.update(self.bars[rid], retry=retry)

    def _bar(self, rid: str) -> TaskID:
        if rid not in self.bars:
            url = self.urls.get(rid) or ""
            label = f"{rid[:8]} {_short(url, 32)}"
            self.bars[rid] = self.progress.add_task(
                "", total=None, label=escape(label), status="", retry=None
            )
        return self.bars[rid]

    def _ended(self, rid: str, state: str, info: Any) -> None:
        if rid in self.bars:
            self.progress.remove_task(self.bars.pop(rid))
        url = self.urls.get(rid) or ""
        if state == "SUCCESS" and isinstance(info, dict):
            if info.get("skipped"):  # already there: nothing was transferred
                self.batch.done_bytes.pop(rid, None)
                self.batch.totals.pop(rid, None)
                said = f"already present, {size(info.get('size') or 0)} {info.get('path')}"
            else:
                self.batch.done_bytes[rid] = self.batch.totals[rid] = int(info.get("size") or 0)
                said = f"{size(info.get('size') or 0)} {info.get('path')}"
            self.say(f"[green]done[/]   {rid}  {escape(said)}  {escape(url)}")
        else:
            said = message(state, info)
            self.say(f"[red]{state.lower():6}[/] {rid}  {escape(url)}: {escape(said)}")

    def _show_batch(self) -> None:
        done = sum(self.batch.done_bytes.values())
        running = [r for r, s in self.batch.states.items() if s not in DONE_STATES]
        # The batch's size is known once every download still to come has said its size.
        unknown = any(r not in self.batch.totals for r in running)
        total = None if unknown else sum(self.batch.totals.values())
        self.progress.update(
            self.total, completed=done, total=total, label="batch", status=self.batch.line()
        )


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]
