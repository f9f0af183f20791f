"""Judge a soak run by the figures the report defines, and write docs/soak.md.

- accounted for: an accepted download ended SUCCESS with a file whose sha256 is the origin's
  body, or FAILURE with the message its case is built to cause; nothing left PENDING or STARTED.
- never two writers: no transfer of a download began while another of its transfers was still
  sending a body that then completed (read at the origin, per download's own URL path).
- no needless transfer: full bodies (200 with body bytes) per download beyond the first, each
  with the cause read off the transfer before it; a full body after a complete one is needless,
  unless a child was SIGKILLed between a tenth of a second before that one's start (its request
  on the way) and half a second after its end (a body can leave the origin whole and die in a
  socket buffer, or before the worker has written and checked it: then nothing on disk could
  be published).
- nothing left: no file under .partial/ once the fleet is idle.
- memory flat: each worker child's RSS at its last sample against its first.
- an origin down for minutes: each download of the case with a deadline (`down=1`, down longer
  than the retry budget lasts, the deadline longer than an outage) ends SUCCESS, as every case
  built to succeed must; the report gives the most attempts one took."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

from soak.origin import Ledger, Transfer

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
# How long after a body has left the origin its worker may still be reading, writing and
# hashing it, before the record that lets the next run publish it is on the file: a child
# SIGKILLed in that window leaves nothing to publish, whatever the origin sent.
ARRIVING_S = 0.5
# How long before the origin logs a request its child may already have sent it: a child killed
# with its request on the way still gets a whole body sent to its dead socket.
IN_FLIGHT_S = 0.1
KILLED_AS_IT_ARRIVED = (
    "cut by the chaos (a child SIGKILLed as the body left the origin, before it could be on disk "
    "whole)"
)


def judge(
    *,
    books: Any,
    ledger: Ledger,
    events: list[Any],
    rss: dict[int, list[int]],
    partial_left: list[str],
    timings: dict[str, float],
    size: Any,
    seed: int,
) -> dict[str, Any]:
    outcomes: Counter[tuple[str, str]] = Counter()
    unaccounted: list[str] = []
    extra_causes: Counter[str] = Counter()
    doubles: list[str] = []
    needless_detail: list[dict[str, Any]] = []
    arrived_detail: list[dict[str, Any]] = []  # whole bodies whose child was killed as they came
    served = expected = 0
    for tid, d in books.accepted.items():
        end = books.ended.get(tid)
        verdict = _verdict(d, end)
        outcomes[(d.case.name, verdict)] += 1
        if verdict != "as built":
            unaccounted.append(f"{d.key} ({d.case.name}): {verdict}")
        transfers = ledger.of(d.key)
        doubles += [f"{d.key}: {w}" for w in _double_writers(transfers)]
        for cause in _extra_transfers(d, transfers, events):
            extra_causes[cause] += 1
            if cause.startswith("needless"):
                needless_detail.append(_transfer_detail(d, end, transfers, events))
            elif cause.startswith(KILLED_AS_IT_ARRIVED):
                arrived_detail.append(_transfer_detail(d, end, transfers, events))
        served += sum(t.body_bytes for t in transfers)
        expected += d.size if end is not None and end.state == "SUCCESS" else 0
    growth = {pid: (s[-1] - s[0]) / MiB for pid, s in rss.items() if len(s) >= 2}
    needless = sum(n for c, n in extra_causes.items() if c.startswith("needless"))
    accepted = len(books.accepted)
    return {
        "ok": not unaccounted and not doubles and not partial_left and not needless,
        "seed": seed,
        "accepted": accepted,
        "accounted": accepted - len(unaccounted),
        "unaccounted": unaccounted[:50],
        "submit_retries": books.submit_retries,
        "outcomes": {f"{c} -> {v}": n for (c, v), n in sorted(outcomes.items())},
        "double_writers": doubles[:50],
        "extra_full_transfers": dict(extra_causes.most_common()),
        "needless": needless,
        "needless_detail": needless_detail[:20],
        "killed_as_it_arrived_detail": arrived_detail[:20],
        "bytes_served_over_stored": served / expected if expected else 0.0,
        "partial_left": partial_left[:50],
        "faults": dict(Counter(e.kind for e in events)),
        "outages_s": [float(e.detail.split()[0]) for e in events if e.kind.startswith("Redis")],
        "largest_redis_gap_s": _largest_gap([e.at for e in events if e.kind.startswith("Redis")]),
        "node_outages_s": [
            float(e.detail.split()[0]) for e in events if e.kind.startswith("RabbitMQ")
        ],
        "worker_deaths": [e.detail for e in events if e.kind == "worker died on its own"],
        "children_sampled": len(growth),
        "rss_growth_mib_max": max(growth.values(), default=0.0),
        "rss_growth_mib_median": sorted(growth.values())[len(growth) // 2] if growth else 0.0,
        "rss_mib_by_child": {pid: [round(x / MiB, 1) for x in s] for pid, s in rss.items()},
        "down_origin": _down_origin(books, size),
        "timings_s": timings,
        "size": {"downloads": size.downloads, "big_mib": size.big / MiB},
    }


def _verdict(d: Any, end: Any) -> str:
    if end is None:
        return "never ended (PENDING or STARTED)"
    if d.case.expect == "SUCCESS":
        if end.state != "SUCCESS":
            return f"FAILURE: {str(end.result)[:160]}"
        return "as built" if end.file_ok else "SUCCESS but the file is missing or wrong"
    if end.state == "SUCCESS":
        return "SUCCESS where the case is built to fail"
    message = str((end.result or {}).get("exc_message", end.result))
    return "as built" if d.case.expect in message else f"FAILURE of another kind: {message[:160]}"


def _down_origin(books: Any, size: Any) -> dict[str, Any]:
    """The downloads of the origin that is down for minutes, with a deadline."""
    ends = [books.ended.get(tid) for tid, d in books.accepted.items() if d.case.deadline]
    done = [e.result for e in ends if e is not None and e.state == "SUCCESS"]
    down_s, up_s = getattr(size, "origin_down", (0, 0))
    return {
        "down_s": down_s,
        "up_s": up_s,
        "downloads": len(ends),
        "success": len(done),
        "attempts_max": max((int(r.get("attempts", 0)) for r in done), default=0),
    }


def _double_writers(transfers: list[Transfer]) -> list[str]:
    found = []
    bodies = [t for t in transfers if t.status in (200, 206) and t.body_bytes]
    for a in bodies:
        for b in bodies:
            if a is not b and a.start < b.start < a.end and a.complete:
                found.append(f"a transfer began {b.start - a.start:.2f} s into one that completed")
    return found


def _largest_gap(times: list[float]) -> float:
    return max((b - a for a, b in itertools.pairwise(sorted(times))), default=0.0)


def _extra_transfers(d: Any, transfers: list[Transfer], events: list[Any]) -> list[str]:
    causes = []
    for i, t in enumerate(transfers):
        if not t.full_body or not any(p.full_body for p in transfers[:i]):
            continue
        before = [p for p in transfers[:i] if p.status in (200, 206) and p.body_bytes]
        prev = before[-1]
        if prev.complete:
            if _killed_as_it_arrived(prev, events):
                causes.append(KILLED_AS_IT_ARRIVED)
            else:
                causes.append(f"needless: the body before it had arrived whole ({d.case.name})")
            continue
        first = prev is before[0]
        causes.append(f"{_why_cut(d, prev, events, first)}; {_why_whole(d, t, prev)}")
    return causes


def _killed_as_it_arrived(prev: Transfer, events: list[Any]) -> bool:
    return any(
        e.kind == "child SIGKILLed" and prev.start - IN_FLIGHT_S <= e.at <= prev.end + ARRIVING_S
        for e in events
    )


def _transfer_detail(
    d: Any, end: Any, transfers: list[Transfer], events: list[Any]
) -> dict[str, Any]:
    """What the report knows of a download fetched whole twice (needless, or after its child was
    killed as the body came): its transfers and the faults around them, times in seconds from
    its first transfer."""
    t0 = transfers[0].start
    first, last = t0 - 5, max(t.end for t in transfers) + 5
    return {
        "download": d.key,
        "case": d.case.name,
        "ended": None if end is None else end.state,
        "attempts": None if end is None else (end.result or {}).get("attempts"),
        "transfers": [
            f"{t.start - t0:.2f}-{t.end - t0:.2f} s: {t.status}, {t.body_bytes} of {t.length}"
            f"{'' if t.range_start is None else f' from {t.range_start}'}"
            for t in transfers
        ],
        "faults": [
            f"{e.at - t0:.2f} s: {e.kind} {e.detail}".strip()
            for e in events
            if first <= e.at <= last or first <= (e.end or e.at) <= last
        ],
    }


def _why_cut(d: Any, prev: Transfer, events: list[Any], first: bool) -> str:
    query = d.case.query
    every_time = "short" in query or ("cut" in query and "cut_times" not in query)
    if every_time or (first and any(w in query for w in ("cut", "stall"))):
        return f"cut by the case ({d.case.name})"
    for e in events:
        if e.at - 1 <= prev.end <= (e.end or e.at) + 5:
            return f"cut by the chaos ({e.kind})"
    return "cut for a reason the report cannot name"


def _why_whole(d: Any, t: Transfer, prev: Transfer) -> str:
    if t.range_start is not None:
        return "the origin ignored Range"
    if "noetag" in d.case.query:
        return "no validator to resume with"
    if d.size <= 256 * 1024:
        return "a small body is fetched whole (no resume record under 256 KiB)"
    return "the partial was not resumed"


def runs_table(docs: Path) -> list[str]:
    """The resized runs reported beside the default one (docs/soak-<N>-<broker>.json): one row
    each, largest first."""
    runs = []
    for path in docs.glob("soak-*-*.json"):
        if path.stem.split("-")[1].isdigit():
            runs.append((path, json.loads(path.read_text())))
    if not runs:
        return []
    lines = [
        "## The largest runs",
        "",
        "| report | broker | accepted | accounted | double writers | needless | left in "
        "`.partial/` | Redis crashes | node crashes | child kills | worker restarts | longest "
        "time between Redis crashes | chaos + drain | child RSS growth, median / largest |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for path, f in sorted(runs, key=lambda run: -run[1]["accepted"]):
        faults, t = f["faults"], f["timings_s"]
        lines.append(
            f"| [{path.stem}]({path.stem}.md) | {f.get('broker', 'redis')} | {f['accepted']} | "
            f"{100 * f['accounted'] / max(1, f['accepted']):.2f} % | {len(f['double_writers'])} | "
            f"{f['needless']} | {len(f['partial_left'])} | {faults.get('Redis SIGKILLed', 0)} | "
            f"{faults.get('RabbitMQ node SIGKILLed', 0)} | {faults.get('child SIGKILLed', 0)} | "
            f"{faults.get('worker restarted (SIGTERM)', 0)} | "
            f"{f.get('largest_redis_gap_s', 0):.0f} s | "
            f"{(t['chaos_s'] + t['drain_s']) / 60:.0f} min | "
            f"{f['rss_growth_mib_median']:+.1f} / {f['rss_growth_mib_max']:+.1f} MiB |"
        )
    return [*lines, ""]


def _down_line(d: dict[str, Any]) -> str:
    return (
        f"- an origin down {d['down_s']:.0f} s of every {d['down_s'] + d['up_s']:.0f} s (503): "
        f"**{d['success']}** of {d['downloads']} downloads with a deadline ended SUCCESS, one "
        f"after {d['attempts_max']} attempts (the retry budget alone: "
        f"{d.get('attempt_budget', '?')})"
    )


def markdown(f: dict[str, Any], runs: list[str] | None = None) -> str:
    lines = [
        "# Chaos soak report",
        "",
        "Written by `make soak` (the figures below are from its last run; see docs/reliability.md",
        "(The chaos soak) for what it proves and `soak/report.py` for each definition).",
        "",
        f"- broker: **{f.get('broker', 'redis')}** (results in Redis either way)"
        + (f"; disk reservations on, margin {f['disk_margin']}" if f.get("disk_margin") else ""),
        f"- downloads accepted: **{f['accepted']}**; accounted for: **{f['accounted']}** "
        f"({100 * f['accounted'] / max(1, f['accepted']):.2f} %)",
        f"- double writers: **{len(f['double_writers'])}**; needless full transfers: "
        f"**{f['needless']}**; files left in `.partial/`: **{len(f['partial_left'])}**",
        f"- body bytes served / bytes of the successful files: {f['bytes_served_over_stored']:.3f}",
        f"- child RSS, last sample against first, over {f['children_sampled']} children: median "
        f"{f['rss_growth_mib_median']:+.1f} MiB, largest {f['rss_growth_mib_max']:+.1f} MiB "
        "(where the largest steps came from: [reliability.md](reliability.md), The chaos soak)",
        f"- chaos ran {f['timings_s']['chaos_s']:.0f} s; the queue drained "
        f"{f['timings_s']['drain_s']:.0f} s later; submissions retried while the broker was away: "
        f"{f['submit_retries']}",
        *(
            [f"- longest time from one Redis crash to the next: {f['largest_redis_gap_s']:.0f} s"]
            if "largest_redis_gap_s" in f  # reports from before it was measured lack it
            else []
        ),
        *(
            [
                f"- downloads queued (the queue and its woken lane), sampled every 5 s: median "
                f"{f['backlog']['median']:.0f}, largest {f['backlog']['max']}"
            ]
            if "backlog" in f  # reports from before it was sampled lack it
            else []
        ),
        *([_down_line(f["down_origin"])] if "down_origin" in f else []),
        f"- workers that died on their own: {len(f['worker_deaths'])}",
        "",
        "## Faults injected by the driver",
        "",
        "| fault | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(f["faults"].items())],
        "",
        f"Redis outages (s): {', '.join(f'{s:.0f}' for s in f['outages_s']) or 'none'}",
        *(
            [f"RabbitMQ node outages (s): {', '.join(f'{s:.0f}' for s in f['node_outages_s'])}"]
            if f.get("node_outages_s")
            else []
        ),
        "",
        "## Outcomes by case (the origin's faults)",
        "",
        "| case -> verdict | downloads |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in f["outcomes"].items()],
        "",
        "## Full transfers beyond the first, by cause",
        "",
        "| cause | transfers |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in f["extra_full_transfers"].items()],
        "",
    ]
    findings = ("unaccounted", "double_writers", "partial_left", "worker_deaths", "needless_detail",
                "killed_as_it_arrived_detail")  # fmt: skip
    if any(f.get(name) for name in findings):
        lines += ["## Findings", ""]
        for name in findings:
            lines += [f"- {name}: {x}" for x in f.get(name, [])]
        lines.append("")
    return "\n".join([*lines, *(runs or [])])
