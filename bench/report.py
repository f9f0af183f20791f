"""docs/benchmarks.md and its plots from the figures of one run (also kept as JSON beside them,
so `python -m bench report` redraws the report without measuring again)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import bandwidth, groups, lanes, latency, live_view, seed, segments
from bench.large import DEFAULT_CHUNK, chunk_label
from bench.small import AS_LONG
from bench.stats import fmt, ratios

RSS_PLOT, LARGE_PLOT, SMALL_PLOT = "bench-rss.png", "bench-large.png", "bench-small.png"
GROWTH_TARGET_MIB, LARGE_RSS_TARGET_MIB, LARGE_SPEED_TARGET = 4.0, 16.0, 0.9
SMALL_TARGET, CONNECTIONS_TARGET = 0.65, 2
CHILD_CPU_TARGET_MS, MAIN_CPU_TARGET, SEED_TARGET, LATENCY_TARGET = 2.8, 1.1, 0.8, 0.9
PSS_IDLE_TARGET_MIB, PSS_AFTER_TARGET_MIB = 11.0, 13.0
# The durable limit: the same bytes, from memory (the page cache), written and fsynced.
DURABLE = "dd + fsync"
# An earlier profile of the same kind, shown beside this run's (bench/profile.py's summary).
BEFORE = Path(__file__).with_name("profile_before.json")


def write(results: Mapping[str, Any], docs: Path) -> Path:
    docs.mkdir(parents=True, exist_ok=True)
    (docs / "benchmarks.json").write_text(json.dumps(results, indent=1) + "\n")
    plotted = plots(results, docs)
    path = docs / "benchmarks.md"
    path.write_text(render(results, plotted))
    return path


def render(r: Mapping[str, Any], plotted: bool = True) -> str:
    parts = [_header(r), _targets(r)]
    if "memory" in r:
        parts.append(_memory(r["memory"], plotted))
    if "large" in r:
        parts.append(_large(r["large"], plotted))
    if "small" in r:
        parts.append(_small(r["small"], plotted))
    if "profile" in r:
        parts.append(_profile(r["profile"], r.get("large")))
    if "latency" in r:
        parts.append(latency.render(r["latency"]))
    if "live_view" in r:
        parts.append(live_view.render(r["live_view"]))
    if "seed" in r:
        parts.append(seed.render(r["seed"]))
    if "lanes" in r:
        parts.append(lanes.render(r["lanes"]))
    if "groups" in r:
        parts.append(groups.render(r["groups"]))
    if "bandwidth" in r:
        parts.append(bandwidth.render(r["bandwidth"]))
    if "segments" in r:
        parts.append(segments.render(r["segments"]))
    return "\n".join(parts)


def _header(r: Mapping[str, Any]) -> str:
    m = r["machine"]
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    tools = "; ".join(f"{k}: {v}" for k, v in m["tools"].items())
    kind = "BENCH_QUICK=1 (smoke run: fewer downloads and runs)" if r["config"]["quick"] else "full"
    return f"""# Benchmarks

Measured by `make bench` ({kind}) on **{m["date"]}**, in {r["duration_s"] / 60:.1f} minutes.
All traffic is on 127.0.0.1: a private redis-server, real `celery -A worker worker` processes
(prefork, 2 children), nginx as the origin. Every figure is a **median (min-max)** of the runs
stated; every ratio is taken run by run against a peer measured **in the same round**, then
summarised the same way. Absolute figures move with the machine's load; ratios move much less.

- Machine: {m["nproc"]} cores ({m["cpu"]}), {m["memory_gib"]} GiB, Linux {m["kernel"]},
  Python {m["python"]}
- Python packages: {pkgs}
- Tools: {tools}
- Load average at start / end: {m["load_at_start"]} / {r["load_at_end"]} (the benchmark's own
  processes count in it; a figure well above 2 on 2 cores means something else was running)
- MB/s means 10^6 bytes per second; MiB is 2^20 bytes.
"""


def _targets(r: Mapping[str, Any]) -> str:
    rows = []
    mem = {v["key"]: v for v in r.get("memory", {}).get("variants", [])}
    if "a" in mem:
        a = mem["a"]
        growth = max(a["growth_from_idle_mib"])
        rows.append(
            (
                f"child RSS growth over {a['downloads']:,} downloads, recycling off",
                f"<= {GROWTH_TARGET_MIB:g} MiB",
                f"{growth:.1f} MiB (largest child, from idle)",
                growth <= GROWTH_TARGET_MIB,
            )
        )
        per_child = a["connections"] / 2
        rows.append(
            (
                f"TCP connections for {a['downloads']:,} downloads from one host",
                f"<= {CONNECTIONS_TARGET} per child",
                f"{a['connections']} in all, {per_child:g} per child",
                per_child <= CONNECTIONS_TARGET,
            )
        )
    large = r.get("large")
    if large and "worker" in large.get("rss_growth_mib", {}):
        g = large["rss_growth_mib"]["worker"]
        rows.append(
            (
                "1 GiB: child RSS over its idle RSS",
                f"<= {LARGE_RSS_TARGET_MIB:g} MiB",
                f"{fmt(g, 1)} MiB",
                g["max"] <= LARGE_RSS_TARGET_MIB,
            )
        )
    if large and DURABLE in large.get("worker_vs", {}):
        v = large["worker_vs"][DURABLE]
        rows.append(
            (
                "1 GiB: speed against the durable limit (the same bytes written with fsync)",
                f">= {LARGE_SPEED_TARGET:g} x",
                f"{fmt(v, 2)} x",
                v["median"] >= LARGE_SPEED_TARGET,
            )
        )
    small = r.get("small")
    if small:
        v = small["worker_vs_noop"]
        rows.append(
            (
                f"{small['files']:,} x 16 KiB: files/s against the no-op task",
                f">= {SMALL_TARGET:g} x",
                f"{fmt(v, 2)} x",
                v["median"] >= SMALL_TARGET,
            )
        )
    if small and "cpu_ms_per_task" in small:
        child = small["cpu_ms_per_task"]["worker"]["child"]
        rows.append(
            (
                "16 KiB: the worker child's CPU a download",
                f"<= {CHILD_CPU_TARGET_MS:g} ms",
                f"{fmt(child, 2)} ms",
                child["median"] <= CHILD_CPU_TARGET_MS,
            )
        )
        main = small["cpu_vs_noop"]["main"]
        rows.append(
            (
                "16 KiB: the main process's CPU a download against the no-op's",
                f"<= {MAIN_CPU_TARGET:g} x",
                f"{fmt(main, 2)} x",
                main["median"] <= MAIN_CPU_TARGET,
            )
        )
    rows += _latency_targets(r.get("latency", {}).get("by_slots", {}))
    seed_run = r.get("seed")
    if seed_run:
        v = seed_run["worker_vs_curl"]
        rows.append(
            (
                f"the seed's batch, {seed_run['images']:,} images: against curl --parallel-max "
                f"{seed_run['cap']}",
                f">= {SEED_TARGET:g} x",
                f"{fmt(v, 2)} x",
                v["median"] >= SEED_TARGET,
            )
        )
    if "bandwidth" in r:
        rows.append(bandwidth.target_row(r["bandwidth"]))
    if "segments" in r:
        rows += segments.target_rows(r["segments"])
    view = r.get("live_view")
    if view:
        share = view["terminal"]["cpu_share"]
        rows.append(
            (
                f"`downloads submit --wait`, {view['downloads']:,} downloads: the command's CPU "
                "on a terminal",
                f"<= {live_view.CPU_TARGET:.0%} of one core",
                f"{share:.1%}",
                share <= live_view.CPU_TARGET,
            )
        )
    lines = ["## Targets", "", "| target | wanted | measured | |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'met' if ok else '**missed**'} |" for a, b, c, ok in rows]
    lines += _why_missed(r)
    return "\n".join(lines) + "\n"


def _latency_targets(by_slots: Mapping[str, Any]) -> list[tuple[str, str, str, bool]]:
    """32 slots: files/s against curl at 100 ms, and PSS a slot idle and after the runs."""
    row = by_slots.get("32")
    if not row:
        return []
    rows = []
    if "100" in row:
        v = row["100"]["worker_vs_curl"]
        rows.append(
            (
                "32 slots, 100 ms to first byte: files/s against curl --parallel-max 32",
                f">= {LATENCY_TARGET:g} x",
                f"{fmt(v, 2)} x",
                v["median"] >= LATENCY_TARGET,
            )
        )
    for when, target in (("idle", PSS_IDLE_TARGET_MIB), ("after", PSS_AFTER_TARGET_MIB)):
        if when in row:
            pss = row[when]["pss_per_slot_mib"]
            rows.append(
                (
                    f"32 slots: PSS a slot, {'idle' if when == 'idle' else 'after the runs'}",
                    f"<= {target:g} MiB",
                    f"{pss:.1f} MiB",
                    pss <= target,
                )
            )
    return rows


def _why_missed(r: Mapping[str, Any]) -> list[str]:
    """The ratios behind the targets, read together: the large body's, the main process's
    against both no-ops, the memory a slot against the no-op's."""
    lines: list[str] = []
    vs = r.get("large", {}).get("worker_vs", {})
    if {"curl", "curl + fsync", DURABLE} <= set(vs):
        lines += [
            "",
            f"The 1 GiB ratios read together: {fmt(vs[DURABLE], 2)} x the durable limit (the "
            "disk taking the same bytes with an fsync: the most a download that is on disk when "
            f"it reports SUCCESS can reach), {fmt(vs['curl + fsync'], 2)} x `curl` followed by "
            f"an fsync (a download made as durable by hand), and {fmt(vs['curl'], 2)} x plain "
            "`curl`, which finishes into the page cache and leaves the disk write for later.",
        ]
    small = r.get("small", {})
    if "cpu_vs_noop_as_long" in small:
        cpu = small["cpu_ms_per_task"]
        lines += [
            "",
            "The main process's CPU a task read against both no-ops: "
            f"{fmt(cpu['worker']['main'], 2)} ms a download, {fmt(cpu['no-op task']['main'], 2)} "
            f"ms a no-op, {fmt(cpu[AS_LONG]['main'], 2)} ms a no-op that holds its child as long "
            f"as a download (download / that no-op: "
            f"{fmt(small['cpu_vs_noop_as_long']['main'], 2)} x). The main process does the same "
            "work for either task; what it spends more on a download it spends on the pace of "
            "tasks, as the long no-op shows: tasks that end further apart wake its event loop "
            "once each, where quick ones share a wake-up.",
        ]
    noop = r.get("latency", {}).get("noop")
    row = r.get("latency", {}).get("by_slots", {}).get(str(noop["slots"]) if noop else "")
    if noop and row and "after" in row:
        lines += [
            "",
            f"PSS a slot at {noop['slots']} slots after the runs read against Celery alone: the "
            f"download's worker {row['idle']['pss_per_slot_mib']:.1f} -> "
            f"{row['after']['pss_per_slot_mib']:.1f} MiB, the no-op's "
            f"{noop['idle']['pss_per_slot_mib']:.1f} -> {noop['after']['pss_per_slot_mib']:.1f} "
            f"MiB; USS a child {row['idle']['uss_per_child_mib']:.1f} -> "
            f"{row['after']['uss_per_child_mib']:.1f} against "
            f"{noop['idle']['uss_per_child_mib']:.1f} -> {noop['after']['uss_per_child_mib']:.1f}"
            " MiB. A child's own pages after its first tasks are pages it shared with the main "
            "process and wrote to (CPython writes reference counts and, in 3.11, each "
            "function's bytecode caches into the objects it uses): see docs/performance.md.",
        ]
    return lines


def _memory(m: Mapping[str, Any], plotted: bool) -> str:
    lines = [
        "## 1. Memory and connections over many downloads",
        "",
        f"{m['downloads']:,} downloads of 16 KiB per variant, submitted in batches of "
        f"{m['batch']}; after each batch the RSS of every child is read. Recycling is off "
        "(`WORKER_MAX_TASKS_PER_CHILD=0`, `WORKER_MAX_MEMORY_PER_CHILD=0`) except in the last "
        "variant. A new nginx (and port) per variant, so its accept count and the TIME_WAIT "
        "sockets on its port are that variant's alone. One run of each: this part is about "
        "growth over a long run, not about speed.",
        "",
    ]
    if plotted:
        lines += [f"![RSS against downloads]({RSS_PLOT})", ""]
    lines += [
        "| variant | child RSS idle MiB | growth from idle | growth after the first batch "
        "| children (2 = none replaced) | TCP connections | TIME_WAIT | child CPU ms/download "
        "| main process CPU ms/download | downloads/s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in m["variants"]:
        cpu = v["cpu_ms_per_download"]
        lines.append(
            f"| {v['label']} | {min(v['idle_mib']):.1f} | {_range(v['growth_from_idle_mib'])} "
            f"| {_range(v['growth_after_first_batch_mib'])} | {v['children_seen']} "
            f"| {v['connections']:,} | {v['time_wait']:,} "
            f"| {'replaced' if cpu is None else f'{cpu:.2f}'} "
            f"| {v['parent_cpu_ms_per_download']:.2f} | {v['downloads_per_s']:.0f} |"
        )
    by = {v["key"]: v for v in m["variants"]}
    lines += ["", _memory_reading(by), ""]
    return "\n".join(lines)


def _memory_reading(by: Mapping[str, Any]) -> str:
    text = []
    if "a" in by and "b" in by:
        a, b = by["a"], by["b"]
        dg = max(b["growth_from_idle_mib"]) - max(a["growth_from_idle_mib"])
        text.append(
            f"The anti-pattern's cost shows in **connections, TIME_WAIT and CPU, not in RSS**: "
            f"on CPython a dropped Session is freed at once (reference counting), so its RSS "
            f"stays within {abs(dg):.1f} MiB of this worker's, but it opened "
            f"{b['connections']:,} TCP connections where this worker opened {a['connections']} "
            f"(one per child), left {b['time_wait']:,} sockets in TIME_WAIT, and its children "
            f"spent {_ratio(b['cpu_ms_per_download'], a['cpu_ms_per_download'])} the CPU per "
            "download."
        )
    if "c-off" in by and "c-on" in by:
        off, on = by["c-off"], by["c-on"]
        text.append(
            f"The leaking task keeps 64 KiB per download: with recycling off its children grow "
            f"by {_range(off['growth_from_idle_mib'])} MiB and never stop; with "
            f"`WORKER_MAX_MEMORY_PER_CHILD={on['recycle_kib']}` (KiB: above the main process's "
            f"peak RSS of {on['parent_peak_mib']:.0f} MiB, since billiard compares the child's "
            f"peak RSS, which it inherits from the main process at fork) children were replaced "
            f"{on['children_seen'] - 2} times and the largest child ended at "
            f"{on['final_max_mib']:.0f} MiB."
        )
    return "\n\n".join(text)


def _large(g: Mapping[str, Any], plotted: bool) -> str:
    lines = [
        "## 2. One large body",
        "",
        f"A {g['bytes'] / 2**30:g} GiB file from nginx, {g['runs']} rounds; in each round every "
        f"client downloads it once, in a rotating order, into a new directory. Memory was "
        f"{g['memory']}. The worker's time runs from `send_task` to the result, so it includes "
        "Celery and the **fsync before the atomic rename** that curl, wget and aria2c do not do; "
        "`curl + fsync` is curl followed by an fsync of its file, the like-for-like peer. Peak "
        "RSS is VmHWM: for the worker child it was reset (`/proc/<pid>/clear_refs`) before each "
        "download; for peers it is the process's whole-life peak.",
        "",
    ]
    if plotted:
        lines += [f"![1 GiB throughput]({LARGE_PLOT})", ""]
    lines += [
        "| client | MB/s | worker / client | peak RSS MiB | child RSS over idle MiB |",
        "|---|---|---|---|---|",
    ]
    for name, speed in g["mb_per_s"].items():
        ratio = g["worker_vs"].get(name)
        growth = g.get("rss_growth_mib", {}).get(name)
        lines.append(
            f"| {name} | {fmt(speed)} | {fmt(ratio, 2) if ratio else '-'} "
            f"| {fmt(g['peak_rss_mib'][name], 1)} | {fmt(growth, 1) if growth else '-'} |"
        )
    if g.get("missing"):
        lines += ["", f"Not measured (not installed): {', '.join(g['missing'])}."]
    return "\n".join(lines) + "\n"


def _small(s: Mapping[str, Any], plotted: bool) -> str:
    lines = [
        "## 3. Many small files",
        "",
        f"{s['files']:,} files of 16 KiB per run, {s['runs']} runs, each client in a rotating "
        "order and into a new directory. The worker and the no-op task (`bench.noop`: same "
        "arguments, returns them) run on **the same worker** (2 children, production settings: "
        "events, late acks, prefetch 1, results stored, recycling after 1,000 tasks), so "
        "configuration, broker and concurrency are the same by construction. Celery clients "
        "submit in a loop, as a producer would; their time runs from the first `send_task` to "
        "the last result's `date_done`. TCP connections are nginx's accept count: the worker "
        "opens one per child, and one more each time a child is replaced after its 1,000th task.",
        "",
    ]
    if plotted:
        lines += [f"![files per second]({SMALL_PLOT})", ""]
    lines += ["| client | files/s | worker / client | TCP connections |", "|---|---|---|---|"]
    for name, rate in s["files_per_s"].items():
        ratio = s["worker_vs"].get(name)
        lines.append(
            f"| {name} | {fmt(rate)} | {fmt(ratio, 2) if ratio else '-'} "
            f"| {fmt(s['connections'][name])} |"
        )
    if s.get("missing"):
        lines += ["", f"Not measured (not installed): {', '.join(s['missing'])}."]
    if "cpu_ms_per_task" in s:
        lines += ["", *_small_cpu(s)]
    return "\n".join(lines) + "\n"


def _small_cpu(s: Mapping[str, Any]) -> list[str]:
    """CPU a task where it is spent, for the download and the no-op on the same worker, and for
    the no-op that holds its child as long as a download (when measured)."""
    cpu = s["cpu_ms_per_task"]
    kernel = (
        "; the kernel's share of it, system time, on its own row" if len(cpu["worker"]) > 3 else ""
    )
    long = s.get("cpu_vs_noop_as_long")
    lines = [
        f"CPU a task (ms), in the worker's children (live and reaped{kernel}), its main process "
        "and Redis, read before and after each run; worker / no-op per run, then the median.",
    ]
    if long:
        lines[0] += (
            f" The long no-op (`bench.noop_as_long`) sleeps {s['hold_s'] * 1000:.2f} ms in its "
            "child, the median time a download held its child in calibration runs before the "
            "timed ones: the main process and Redis then see tasks end at a download's pace."
        )
    head = "| where | download task | no-op task | download / no-op |"
    rule = "|---|---|---|---|"
    if long:
        head += " no-op as long as a download | download / that no-op |"
        rule += "---|---|"
    lines += ["", head, rule]
    for part, ratio in s["cpu_vs_noop"].items():
        row = (
            f"| {part} | {fmt(cpu['worker'][part], 2)} | {fmt(cpu['no-op task'][part], 2)} "
            f"| {fmt(ratio, 2)} |"
        )
        if long:
            row += f" {fmt(cpu[AS_LONG][part], 2)} | {fmt(long[part], 2)} |"
        lines.append(row)
    return lines


def _profile(p: Mapping[str, Any], large: Mapping[str, Any] | None) -> str:
    lines = ["## 4. Where the time goes", ""]
    if "skipped" in p:
        lines.append(f"Profile skipped: {p['skipped']}.")
    else:
        lines += [
            f"py-spy sampled one child (250 Hz, non-blocking) while the worker downloaded "
            f"{p['downloads']:,} files of 16 KiB ({p['samples']:,} samples of the child "
            "running; time waiting for the next task is not sampled).",
            "",
            "Where the samples' innermost frame was (self time by layer):",
            "",
            "| layer | share |",
            "|---|---|",
        ]
        lines += [f"| {name} | {share:.0%} |" for name, share in p["layers"]]
        lines += [
            "",
            "The per-task path, inclusive (a function's share includes what it calls):",
            "",
            "| function | share |",
            "|---|---|",
        ]
        lines += [f"| `{name}` | {share:.0%} |" for name, share in p["path"]]
        if p.get("reading"):
            lines += ["", p["reading"]]
        if BEFORE.exists():
            lines += _before_after(json.loads(BEFORE.read_text()), p)
    lines += ["", "### The choices, with figures", ""]
    lines += _choices(p, large)
    return "\n".join(lines) + "\n"


def _before_after(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """The layers' shares against an earlier profile's; samples a download (one child of two
    sampled, at the same rate) say how much active time the shares are of."""
    was, is_ = dict(before["layers"]), dict(now["layers"])
    per = [p["samples"] / p["downloads"] for p in (before, now)]
    lines = [
        "",
        f"Against the profile of commit {before['commit']} ({before['what']}), taken the same "
        f"way: {per[0]:.2f} samples a download then, {per[1]:.2f} now "
        f"({per[1] / per[0]:.2f} x).",
        "",
        "| layer | share then | share now |",
        "|---|---|---|",
    ]
    for name in dict.fromkeys([*was, *is_]):
        lines.append(f"| {name} | {was.get(name, 0):.0%} | {is_.get(name, 0):.0%} |")
    return lines


def _choices(p: Mapping[str, Any], large: Mapping[str, Any] | None) -> list[str]:
    lines = []
    if large:
        chunks = {k: v for k, v in large["mb_per_s"].items() if k.startswith("worker")}
        lines += [
            "**Chunk size** (`DOWNLOAD_CHUNK_SIZE`, 1 GiB, same rounds as the 1 GiB section):",
            "",
            "| chunk | MB/s | against curl | child RSS over idle MiB |",
            "|---|---|---|---|",
        ]
        for name, speed in chunks.items():
            default_label = chunk_label(DEFAULT_CHUNK)
            label = name.split(", ")[1].replace(" chunks", "") if ", " in name else default_label
            default = " (default)" if name == "worker" else ""
            lines.append(
                f"| {label}{default} | {fmt(speed)} | {fmt(_vs(large, name), 2)} "
                f"| {fmt(large['rss_growth_mib'].get(name), 1)} |"
            )
        lines.append("")
    if "hashing" in p:
        lines.append(
            "**Hashing**: sha256 in this Python runs at "
            + ", ".join(f"{mbs:,.0f} MB/s ({chunk})" for chunk, mbs in p["hashing"].items())
            + ". "
            + p.get("hashing_reading", "")
        )
        lines.append("")
    if "progress" in p:
        q = p["progress"]
        lines.append(
            f"**Progress throttle**: a check that is not due costs {q['check_ns']:.0f} ns; a "
            f"report that is due (result backend write + `task-progress` event) costs "
            f"{q['report_ms']:.2f} ms. At `DOWNLOAD_PROGRESS_INTERVAL=0.5` a 1 GiB download "
            f"makes about {q['reports_per_gib']:.0f} reports ({q['share_per_gib']:.2%} of its "
            f"time) and a 16 KiB download makes none; reporting every chunk instead would add "
            f"{q['every_chunk_ms_per_gib']:.0f} ms per GiB at `DOWNLOAD_CHUNK_SIZE` chunks."
        )
    return lines


def _vs(large: Mapping[str, Any], name: str) -> Mapping[str, Any] | None:
    """A chunk variant against curl, run by run, from the raw figures."""
    raw = large.get("raw", {})
    if name not in raw or "curl" not in raw:
        return None
    return ratios(raw[name], raw["curl"])


def _range(values: list[float]) -> str:
    if not values:
        return "replaced"
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "n/a"
    return f"{a / b:.2f} x"


def plots(r: Mapping[str, Any], docs: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    if "memory" in r:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for v in r["memory"]["variants"]:
            xs = [s["downloads"] for s in v["samples"]]
            ax.plot(xs, [max(s["rss"]) for s in v["samples"]], marker=".", label=v["label"])
        ax.set_xlabel("downloads of 16 KiB (both children)")
        ax.set_ylabel("RSS of the largest child, MiB")
        ax.set_title("Worker child RSS over many downloads")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(docs / RSS_PLOT, dpi=100)
        plt.close(fig)
    for key, unit, name, title in (
        ("large", "mb_per_s", LARGE_PLOT, "1 GiB over loopback, MB/s"),
        ("small", "files_per_s", SMALL_PLOT, "16 KiB files over loopback, files/s"),
    ):
        if key not in r:
            continue
        data = r[key][unit]
        labels = list(data)
        med = [data[k]["median"] for k in labels]
        err = [
            [m - data[k]["min"] for k, m in zip(labels, med, strict=True)],
            [data[k]["max"] - m for k, m in zip(labels, med, strict=True)],
        ]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colors = ["tab:blue" if k.startswith("worker") else "tab:gray" for k in labels]
        ax.barh(labels, med, xerr=err, color=colors, capsize=3)
        ax.invert_yaxis()
        ax.set_title(f"{title} (median, min-max)")
        ax.set_xscale("log" if max(med) / max(min(med), 1e-9) > 30 else "linear")
        ax.grid(axis="x", alpha=0.3)
        fig.tight_layout()
        fig.savefig(docs / name, dpi=100)
        plt.close(fig)
    if "latency" in r:
        latency.plot(r["latency"], docs, plt)
    return True
