"""Rows of downloads (id, url, state, result or error) and their tables: drawn with rich on a
terminal, aligned plain text elsewhere (for grep and logs), JSON for machines."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from download_client.arguments import utc_text
from download_client.contract import WAITING, WAITING_DISK, WAITING_GROUP, WAITING_ORIGIN
from download_client.records import RetryNote

UNKNOWN = "unknown"  # not a Celery state: no record of the id and Celery knows nothing of it
NO_URL = "-"  # the tables' URL of a download whose URL is not known (JSON: null)
FINAL_STATES = frozenset({"SUCCESS", "FAILURE", "REVOKED"})


def row(
    task_id: str, url: str | None, state: str, info: Any, note: RetryNote | None = None
) -> dict[str, Any]:
    """One download as the JSON output shows it: `result` once it succeeded, `error` once it
    failed, `progress` while it runs, `retry` (reason, due, attempt) while it waits to retry,
    `waiting` (reason, since, origin or dest) while it waits without a worker process."""
    out: dict[str, Any] = {"id": task_id, "url": url, "state": state}
    if state == "SUCCESS" and isinstance(info, dict):
        out["result"] = info
        if url is None:  # the result holds its own (redacted) URL
            out["url"] = info.get("url")
    elif state in ("FAILURE", "REVOKED"):
        out["error"] = f"{type(info).__name__}: {info}" if info else state
        out["message"] = message(state, info)
    elif state == "PROGRESS" and isinstance(info, dict):
        out["progress"] = info
    elif state == "RETRY":
        out["retry"] = retry_of(info, note)
    elif state == WAITING:
        out["waiting"] = info if isinstance(info, dict) else {"reason": None}
    return out


def waiting_text(waiting: Mapping[str, Any], now: float) -> str:
    """`waiting for a slot at https://files.example:443 (12 s)`, or for a busy destination."""
    since = waiting.get("since")
    took = f" ({max(0.0, now - since):.0f} s)" if isinstance(since, int | float) else ""
    if waiting.get("reason") == WAITING_ORIGIN:
        return f"waiting for a slot at {waiting.get('origin')}{took}"
    if waiting.get("reason") == WAITING_GROUP:
        return f"waiting for a slot of group {waiting.get('group')}{took}"
    if waiting.get("reason") == WAITING_DISK:
        return f"waiting for {size(float(waiting.get('need') or 0))} of room on the disk{took}"
    if waiting.get("dest"):
        return f"waiting for {waiting['dest']}, which another download is writing{took}"
    return "waiting" + took


def message(state: str, info: Any) -> str:
    """A failure's message as the worker wrote it, without Python's type name or repr."""
    if state == "REVOKED":
        return "cancelled"
    text = str(info) if info is not None else ""
    return text or state


def retry_of(info: Any, note: RetryNote | None) -> dict[str, Any]:
    """Why it retries and when (and the deadline, for a download that has one): the worker's
    note when there is one, else the exception Celery keeps with the RETRY state (the reason
    alone)."""
    if note is not None:
        seen = {"reason": note.reason, "due": note.due, "attempt": note.attempt}
        return seen if note.deadline is None else {**seen, "deadline": note.deadline}
    return {"reason": message("RETRY", info), "due": None, "attempt": None}


def retry_text(retry: Mapping[str, Any], now: float) -> str:
    """`next attempt in 4 s (attempt 2, deadline 2026-12-08T18:00:00Z): connection refused by
    ...`, or the reason alone."""
    parts, within = [], []
    if retry.get("due") is not None:
        parts.append(f"next attempt in {max(0.0, retry['due'] - now):.0f} s")
    if retry.get("attempt") is not None:
        within.append(f"attempt {retry['attempt']}")
    if retry.get("deadline") is not None:
        within.append(f"deadline {utc_text(retry['deadline'])}")
    if within:
        parts.append(f"({', '.join(within)})")
    head = " ".join(parts)
    return f"{head}: {retry['reason']}" if head else retry["reason"]


def write_json(rows: Iterable[dict[str, Any]], out: TextIO) -> None:
    json.dump(list(rows), out)
    out.write("\n")


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def detail(r: Mapping[str, Any], now: float) -> tuple[str, str]:
    """(size, what to say) of a row: the path, the error, the progress or the retry."""
    if r["state"] == "SUCCESS" and "result" in r:
        res = r["result"]
        return size(res["size"]), res["path"] + (" (skipped)" if res.get("skipped") else "")
    if "message" in r:
        return "", r["message"]
    if "progress" in r:
        p = r["progress"]
        total = f" of {size(p['total'])}" if p.get("total") else ""
        return size(p.get("bytes") or 0), f"running, {size(p.get('bytes') or 0)}{total}"
    if "retry" in r:
        return "", "retrying: " + retry_text(r["retry"], now)
    if "waiting" in r:
        return "", waiting_text(r["waiting"], now)
    if r["state"] == UNKNOWN:
        return "", "no download with this id is known here"
    return "", r["state"].lower()


def summary_line(rows: list[dict[str, Any]]) -> str:
    """`8 of 10 succeeded, 1.2 MiB`: the bytes transferred, so a download skipped because its
    file was already there counts none."""
    ok = [r["result"] for r in rows if r["state"] == "SUCCESS" and "result" in r]
    present = sum(bool(res.get("skipped")) for res in ok)
    moved = size(sum(res["size"] for res in ok if not res.get("skipped")))
    also = f" ({present} already present)" if present else ""
    return f"{len(ok)} of {len(rows)} succeeded{also}, {moved}"


def write_plain(rows: list[dict[str, Any]], out: TextIO, now: float) -> None:
    """Aligned columns, one download a line (an error too long for its column follows whole on
    the next line: its cause is often at the end)."""
    out.write(f"{'STATE':8}  {'SIZE':>10}  {'PATH / ERROR':40}  {'ID':36}  URL\n")
    for r in rows:
        amount, said = detail(r, now)
        out.write(
            f"{r['state']:8}  {amount:>10}  {_short(said, 40):40}  {r['id']:36}  "
            f"{r['url'] or NO_URL}\n"
        )
        if len(said) > 40:
            out.write(f"{'':10}  {said}\n")
    out.write(summary_line(rows) + "\n")


def write_rich(rows: list[dict[str, Any]], console: Console, now: float) -> None:
    """A table for people at a terminal: the whole id (to copy into `downloads wait` or
    `cancel`), the state in colour, and the path or the error in full, wrapped."""
    table = Table(show_edge=False, pad_edge=False, expand=False)
    table.add_column("ID", no_wrap=True, style="cyan")
    table.add_column("STATE", no_wrap=True)
    table.add_column("SIZE", justify="right", no_wrap=True)
    table.add_column("PATH / ERROR", overflow="fold")
    table.add_column("URL", overflow="fold")
    for r in rows:
        amount, said = detail(r, now)
        style = _STYLES.get(r["state"], "yellow")
        # Text, not markup: a URL or an error may hold square brackets.
        table.add_row(
            r["id"], Text(r["state"], style=style), amount, Text(said), Text(r["url"] or NO_URL)
        )
    console.print(table)
    console.print(summary_line(rows), highlight=False)


_STYLES = {"SUCCESS": "green", "FAILURE": "red", "REVOKED": "red", UNKNOWN: "magenta"}


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3) :]
