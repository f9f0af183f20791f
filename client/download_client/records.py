"""What the client keeps beside Celery's results, in the result backend's Redis: a record of each
id it submitted (so an id nobody submitted can be called unknown, where Celery says PENDING for
everything) and the workers' retry notes (Celery's RETRY state holds the exception, not when
the next attempt is due)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from download_client.groups import DEFAULT_GROUP

SUBMITTED_PREFIX = "downloads:submitted:"
RETRY_PREFIX = "downloads:retry:"
# The origins with parked downloads (a set), and each one's parked messages (a list per group,
# and one of the urgent ones), as the workers' ledger names them (docs/reliability.md,
# "Per-origin limits").
PARKED_ORIGINS = "downloads:origins:parked"
URGENT_LIST = "urgent"
# The same for a group's cap (DOWNLOAD_GROUP_LIMITS): the groups with downloads parked for it.
PARKED_GROUPS = "downloads:groups:parked"
GROUP_PREFIX = "downloads:group:"
ORIGIN_PREFIX = "downloads:origin:"
# Disk reservations: each volume's leases and the bytes each counts, its parked downloads.
DISK_PREFIX = "downloads:disk:"
DISK_VOLUMES = "downloads:disks:volumes"  # each volume as a worker last measured it
# Bandwidth budgets: each scope's clock, and per scope its rate, bytes and last use (a hash).
RATE_PREFIX = "downloads:rate:"
RATES_STATS = "downloads:rates:stats"
# A burst of this many seconds' worth of a budget's bytes passes without waiting (the workers'
# tolerance, tasks/core/bandwidth.py): a clock further ahead of now is holding downloads back.
RATE_TOLERANCE_S = 0.25
RATE_SHOWN_S = 86400  # a budget unused this long is not shown (a removed setting, a gone worker)
_READ_CHUNK = 1000  # keys a pipeline reads at once: bounded replies for any number of ids


@dataclass(frozen=True)
class RetryNote:
    """Why a download is waiting for another attempt, when that attempt is due, and when its
    deadline ends (None: it has none, and its attempts are counted)."""

    reason: str
    due: float | None  # epoch seconds; None: not known
    attempt: int | None
    deadline: float | None = None  # epoch seconds

    def due_in(self, now: float | None = None) -> float | None:
        """Seconds until the next attempt (0 when it is already due), or None."""
        if self.due is None:
            return None
        return max(0.0, self.due - (time.time() if now is None else now))


def mark_submitted(pipe: Any, task_id: str, shown_url: str, ttl: int) -> None:
    """Queue the record of one submission on a pipeline; the value is the redacted URL, which a
    failed download's result does not hold."""
    pipe.set(SUBMITTED_PREFIX + task_id, shown_url, ex=ttl)


def submitted(client: Any, ids: Sequence[str]) -> dict[str, str]:
    """The ids among `ids` submitted through this client, with their (redacted) URLs."""
    found: dict[str, str] = {}
    for chunk, values in _read(client, SUBMITTED_PREFIX, ids):
        for task_id, value in zip(chunk, values, strict=True):
            if value is not None:
                found[task_id] = _text(value)
    return found


def retry_notes(client: Any, ids: Sequence[str]) -> dict[str, RetryNote]:
    """The retry notes the workers left for `ids` (those that have one), read pipelined."""
    notes: dict[str, RetryNote] = {}
    for chunk, values in _read(client, RETRY_PREFIX, ids):
        for task_id, value in zip(chunk, values, strict=True):
            note = parse_note(value)
            if note is not None:
                notes[task_id] = note
    return notes


def retrying_ids(client: Any, limit: int = 1000) -> list[str]:
    """Ids with a retry note, found by scanning (at most `limit`): the downloads between two
    attempts, which no worker lists as active."""
    ids: list[str] = []
    for key in client.scan_iter(match=RETRY_PREFIX + "*", count=1000):
        ids.append(_text(key)[len(RETRY_PREFIX) :])
        if len(ids) >= limit:
            break
    return ids


def bandwidth(client: Any) -> dict[str, dict[str, float]]:
    """Per bandwidth scope used in the last RATE_SHOWN_S (an origin, or `worker <hostname>`):
    its `rate` (bytes a second), the `bytes` let through, `idle_s` since its last use and
    `ahead_s`, how far its clock runs ahead of now: the seconds of bytes already granted that
    the rate has not caught up with. Above RATE_TOLERANCE_S, downloads there are held back."""
    seconds, micros = client.time()
    now = seconds * 1_000_000 + micros
    out: dict[str, dict[str, float]] = {}
    for name, value in client.hgetall(RATES_STATS).items():
        what, _, scope = _text(name).partition(" ")
        out.setdefault(scope, {})[what] = float(value)
    scopes = sorted(out)
    clocks = client.mget([RATE_PREFIX + scope for scope in scopes]) if scopes else []
    for scope, clock in zip(scopes, clocks, strict=True):
        figures = out[scope]
        figures["ahead_s"] = round(max(0.0, (float(clock or 0) - now) / 1e6), 3)
        figures["idle_s"] = max(0.0, seconds - figures.pop("seen", seconds))
    return {scope: out[scope] for scope in scopes if out[scope]["idle_s"] <= RATE_SHOWN_S}


def disks(client: Any) -> dict[str, dict[str, Any]]:
    """Per volume of the disk reservations measured in the last RATE_SHOWN_S: as a worker last
    measured it (`path`, `host`, `free`, `size`, `margin`, `at`), the bytes reserved and not yet
    written (`reserved`), the downloads holding a reservation (`holders`) and those parked for
    room there (`waiting`)."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    seen = {_text(k): json.loads(v) for k, v in client.hgetall(DISK_VOLUMES).items()}
    names = sorted(n for n, v in seen.items() if seconds - float(v.get("at", 0)) <= RATE_SHOWN_S)
    pipe = client.pipeline(transaction=False)
    for name in names:
        base = f"{DISK_PREFIX}{name}"
        pipe.zrangebyscore(f"{base}:slots", now_ms, "+inf").hgetall(f"{base}:amounts")
    got = pipe.execute() if names else []
    waiting = parked_lists(client, "disk")
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(names):
        live, amounts = _texts(got[2 * i]), {_text(k): int(v) for k, v in got[2 * i + 1].items()}
        reserved = sum(amounts.get(h, 1) for h in live)
        parked_here = sum(waiting.get(name, {}).values())
        out[name] = {**seen[name], "reserved": reserved, "holders": len(live),
                     "waiting": parked_here}  # fmt: skip
    return out


def parked(client: Any) -> dict[str, int]:
    """Origin -> downloads parked there for a slot (urgent ones and every group's)."""
    return {o: sum(lists.values()) for o, lists in parked_lists(client).items()}


def parked_by_group(client: Any) -> dict[str, int]:
    """Group -> downloads parked for a slot at any origin (urgent ones are in no group's
    count) or of their group's cap."""
    out: dict[str, int] = {}
    for lists in parked_lists(client).values():
        for name, n in lists.items():
            if name != URGENT_LIST:
                out[name] = out.get(name, 0) + n
    capped = sorted(_text(g) for g in client.smembers(PARKED_GROUPS))
    pipe = client.pipeline(transaction=False)
    for group in capped:
        own = "" if group == DEFAULT_GROUP else f"-{group}"
        pipe.llen(f"{GROUP_PREFIX}{group}:parked{own}").llen(f"{GROUP_PREFIX}{group}:urgent")
    counts = pipe.execute() if capped else []
    for i, group in enumerate(capped):
        n = int(counts[2 * i]) + int(counts[2 * i + 1])
        if n:
            out[group] = out.get(group, 0) + n
    return out


def parked_lists(client: Any, kind: str = "origin") -> dict[str, dict[str, int]]:
    """Origin (or another scope of budget `kind`: a volume) -> its parked lists that hold any
    (`urgent`, and each group's), and how many each holds, read from the workers' keys in
    Redis: the scopes with any (a set), then per scope its lists (the default group's, the
    urgent one, and the groups with any: a sorted set)."""
    prefix = f"downloads:{kind}:"
    origins = sorted(_text(o) for o in client.smembers(f"downloads:{kind}s:parked"))
    pipe = client.pipeline(transaction=False)
    for origin in origins:
        base = f"{prefix}{origin}"
        pipe.llen(f"{base}:parked").llen(f"{base}:urgent").zrange(f"{base}:groups", 0, -1)
    got = pipe.execute() if origins else []
    out: dict[str, dict[str, int]] = {}
    later: list[tuple[str, str]] = []
    for i, origin in enumerate(origins):
        default, urgent, groups = got[3 * i : 3 * i + 3]
        out[origin] = {DEFAULT_GROUP: int(default), URGENT_LIST: int(urgent)}
        later += [(origin, g) for g in map(_text, groups) if g != DEFAULT_GROUP]
    for (origin, group), n in zip(later, _lengths(client, prefix, later), strict=True):
        out[origin][group] = n
    return {o: {k: n for k, n in lists.items() if n} for o, lists in out.items()
            if any(lists.values())}  # fmt: skip


def _lengths(client: Any, prefix: str, lists: list[tuple[str, str]]) -> list[int]:
    pipe = client.pipeline(transaction=False)
    for origin, group in lists:
        pipe.llen(f"{prefix}{origin}:parked-{group}")
    return [int(n) for n in pipe.execute()] if lists else []


def parse_note(value: Any) -> RetryNote | None:
    """A note as the workers write it (`{"reason", "due", "attempt"}` as JSON, and `deadline`
    for a download that has one); None when there
    is none or it cannot be read (a note is a courtesy: never fail a view over one)."""
    if value is None:
        return None
    try:
        body = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(body, dict) or not isinstance(body.get("reason"), str):
        return None
    attempt = body.get("attempt")
    return RetryNote(
        reason=body["reason"],
        due=_seconds(body.get("due")),
        attempt=attempt if isinstance(attempt, int) and not isinstance(attempt, bool) else None,
        deadline=_seconds(body.get("deadline")),
    )


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _read(client: Any, prefix: str, ids: Iterable[str]) -> Iterator[tuple[list[str], list[Any]]]:
    chunk: list[str] = []
    for task_id in ids:
        chunk.append(task_id)
        if len(chunk) == _READ_CHUNK:
            yield chunk, client.mget([prefix + i for i in chunk])
            chunk = []
    if chunk:
        yield chunk, client.mget([prefix + i for i in chunk])


def _texts(values: Iterable[Any]) -> list[str]:
    return [_text(v) for v in values]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
