"""The live view of `--wait` on a terminal, drawn with rich: a bar per running download (bytes,
speed, time left) and one for the batch, redrawn in place; a line above the bars for each
download that ends. Only what runs or waits to retry has a bar: a batch of thousands shows the
few that move. What waits without a worker process (WAITING: for a slot at its origin, for a
busy destination) and what is still queued are counted in the batch's line.

The view is drawn at most every REDRAW_EVERY seconds, however many downloads move or end: the
states only change the figures, and the lines of the downloads that ended since the last
redraw are printed with it, in one write. (A rich redraw of the bars costs some milliseconds;
one for each update and each line that ended cost a core's worth on a batch of hundreds.)"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.result import AsyncResult
from rich.console import Console
from rich.live import Live
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
)
from rich.text import Text

from download_client.client import DONE_STATES, RUNNING_STATES
from download_client.contract import (
    WAITING,
    WAITING_DESTINATION,
    WAITING_DISK,
    WAITING_GROUP,
    WAITING_ORIGIN,
)
from download_client.records import RetryNote
from download_client.tables import message, retry_of, retry_text, size

# Why WAITING downloads wait, as the batch's line says it (an unknown reason: a busy destination).
_WHY = {
    WAITING_ORIGIN: "for an origin slot",
    WAITING_GROUP: "for their group's cap",
    WAITING_DISK: "for room on the disk",
    WAITING_DESTINATION: "for a busy destination",
}

NotesReader = Callable[[Sequence[str]], dict[str, RetryNote]]
NOTES_EVERY = 1.0  # seconds between reads of the retry notes of downloads in RETRY
REDRAW_EVERY = 0.5  # seconds between two redraws, at the least


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
    reasons: dict[str, str | None] = field(default_factory=dict)  # why each WAITING one waits

    def line(self) -> str:
        states = list(self.states.values())
        ok, failed = states.count("SUCCESS"), states.count("FAILURE") + states.count("REVOKED")
        running = sum(s in RUNNING_STATES and s != "RETRY" for s in states)
        waiting = [r for r, s in self.states.items() if s == WAITING]
        queued = sum(s not in DONE_STATES and s not in RUNNING_STATES for s in states)
        queued -= len(waiting)
        retrying = states.count("RETRY")
        text = (
            f"{ok + failed}/{len(states)} done ({ok} succeeded, {failed} failed), "
            f"{running} running, {len(waiting)} waiting"
        )
        if waiting:
            seen = Counter(_WHY.get(self.reasons.get(r) or "", _WHY[WAITING_DESTINATION])
                           for r in waiting)  # fmt: skip
            text += " (" + ", ".join(f"{seen[w]} {w}" for w in _WHY.values() if seen[w]) + ")"
        text += f", {queued} queued" if queued else ""
        return text + (f", {retrying} retrying" if retrying else "")


class LiveView:
    """Feed it with `wait(..., on_update=view.update, on_poll=view.poll)` inside `with view:`."""

    def __init__(self, urls: dict[str, str | None], console: Console, notes: NotesReader) -> None:
        self.urls, self.console, self.read_notes = urls, console, notes
        self.batch = _Batch({rid: "PENDING" for rid in urls})
        # The bars' figures; never started itself (it would redraw on its own and at each bar
        # added): the view's Live draws it when the view says so.
        self.progress = Progress(
            TextColumn("{task.fields[label]}"),
            BarColumn(bar_width=30),
            DownloadColumn(binary_units=True),
            _SpeedColumn(),
            TimeRemainingColumn(),
            _StatusColumn(),
            console=console,
            auto_refresh=False,
        )
        self.live = Live(self.progress, console=console, auto_refresh=False)
        self.bars: dict[str, TaskID] = {}
        self.total = self.progress.add_task("", total=None, label="batch", status="")
        self.notes_read = 0.0
        self.drawn = 0.0
        self.redraws = 0
        self.lines: list[str] = []  # to print above the bars at the next redraw
        self.lock = threading.Lock()  # `say` may come from another thread
        self._show_batch()

    def __enter__(self) -> LiveView:
        self.live.start(refresh=True)
        self.drawn = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        self.draw()
        self.live.stop()

    def say(self, text: str) -> None:
        """A line above the bars (a warning, a download that ended), printed at the next
        redraw."""
        with self.lock:
            self.lines.append(text)

    def draw(self) -> None:
        """Redraw now: the batch's figures, the lines said since the last redraw, the bars."""
        self._show_batch()
        with self.lock:
            lines, self.lines = self.lines, []
        if lines:  # printed above the live bars, which rich redraws below them
            self.console.print("\n".join(lines), highlight=False)
        else:
            self.live.refresh()
        self.redraws += 1
        self.drawn = time.monotonic()

    def update(self, result: AsyncResult, state: str, info: Any) -> None:
        rid = result.id
        self.batch.states[rid] = state
        if state == WAITING:
            self.batch.reasons[rid] = info.get("reason") if isinstance(info, dict) else None
            if rid in self.bars:  # it ran and waits again: it has no process, so no bar
                self.progress.remove_task(self.bars.pop(rid))
        elif state in DONE_STATES:
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

    def poll(self) -> None:
        """Between two reads of the states: a redraw, when the last is REDRAW_EVERY old; the
        retry notes of downloads in RETRY (a worker writes its note beside the state, so it
        may come a little later)."""
        now = time.monotonic()
        if now - self.drawn >= REDRAW_EVERY:
            self.draw()
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


class _SpeedColumn(ProgressColumn):
    """The speed in the tables' binary units (`97.7 KiB/s`), as the sizes beside it."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("?", style="progress.data.speed")
        return Text(f"{size(speed)}/s", style="progress.data.speed")


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]
