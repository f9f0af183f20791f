"""Latency section: an origin that waits before answering (time to first byte), this worker
at several slot counts against curl --parallel and aria2c at equal parallelism, and the worker's
PSS a slot (main process and children, from /proc/<pid>/smaps_rollup)."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench.config import KIB, MIB, Config
from bench.small import _aria2, _celery, _curl
from bench.stack import Stack, available, rotated
from bench.stats import fmt, ratios, summary
from download_client.contract import TASK_NAME
from tests.harness import Worker

TTFB_MS = (20, 100, 300)
BODY = b"\0" * (16 * KIB)
PLOT = "bench-latency.png"


class _Delayed(BaseHTTPRequestHandler):
    """GET /<ms>/<name>: nothing at all for <ms> milliseconds, then 16 KiB."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        time.sleep(int(self.path.split("/")[1]) / 1000)
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.wfile.write(BODY)


class DelayedOrigin(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # 32 clients connecting at once must not wait on the backlog

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Delayed)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, ms: int) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/{ms}"


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * KIB
    raise KeyError("Pss")


def run(stack: Stack, cfg: Config) -> dict[str, Any]:
    slot_counts = (2, 8) if cfg.quick else (2, 8, 32)
    rounds, waves = (1, 3) if cfg.quick else (3, 6)
    origin = DelayedOrigin()
    table: dict[str, Any] = {}
    try:
        for slots in slot_counts:
            table[str(slots)] = _slots(stack, origin, slots, rounds, waves)
    finally:
        origin.shutdown()
        origin.server_close()
    return {"rounds": rounds, "ttfb_ms": list(TTFB_MS), "by_slots": table}


def _slots(
    stack: Stack, origin: DelayedOrigin, slots: int, rounds: int, waves: int
) -> dict[str, Any]:
    # Every slot at the one delayed origin: its per-origin cap is the slot count.
    w = stack.worker(
        f"lat{slots}", WORKER_CONCURRENCY=str(slots), DOWNLOAD_HOST_CONCURRENCY=str(slots)
    )
    n = slots * waves  # every slot busy for `waves` downloads in a row
    names = [f"f{i:04d}.bin" for i in range(n)]
    out: dict[str, Any] = {}
    try:
        # Not timed: every child opens its connection and imports what it imports lazily first.
        warm = [f"{origin.url(0)}/{name}" for name in names]
        _celery(stack, w, TASK_NAME, warm, f"lat/{slots}/warm", n)
        for ms in TTFB_MS:
            urls = [f"{origin.url(ms)}/{name}" for name in names]
            out[str(ms)] = _cell(stack, w, slots, urls, names, rounds, f"lat/{slots}/{ms}")
        # After the runs: every child has served downloads and dirtied what it dirties.
        pids = [w.proc.pid, *w.children()] if w.proc else []
        out["pss_per_slot_mib"] = sum(pss_bytes(p) for p in pids) / slots / MIB
    finally:
        stack.stop_worker(w)
    return out


def _cell(
    stack: Stack,
    w: Worker,
    slots: int,
    urls: list[str],
    names: list[str],
    rounds: int,
    prefix: str,
) -> dict[str, Any]:
    work = stack.work / prefix
    work.mkdir(parents=True)
    (work / "urls.txt").write_text("".join(u + "\n" for u in urls))
    n = len(urls)
    parallel = ("-Z", "--parallel-max", str(slots))
    clients = {
        "worker": lambda out, r: _celery(stack, w, TASK_NAME, urls, f"{prefix}/w{r}", n),
        "curl --parallel": lambda out, r: _curl(out, urls, names, *parallel),
    }
    found, _ = available(
        {f"aria2c -j{slots}": ("aria2c", lambda out, r: _aria2(out, work / "urls.txt", slots))}
    )
    clients.update(found)
    rates: dict[str, list[float]] = {k: [] for k in clients}
    for r in range(rounds):
        for name in rotated(list(clients), r):
            out = work / f"{r}-{list(clients).index(name)}"
            out.mkdir()
            rates[name].append(n / clients[name](out, r))
    return {
        "files_per_s": {k: summary(v) for k, v in rates.items()},
        "worker_vs_curl": ratios(rates["worker"], rates["curl --parallel"]),
    }


def render(lat: Mapping[str, Any]) -> str:
    lines = [
        "## 5. Latency: slots against time to first byte",
        "",
        f"![files/s against slots]({PLOT})",
        "",
        "16 KiB files from an origin that answers after the given delay; medians (min-max) over "
        f"{lat['rounds']} rounds; the worker's PSS (main process and children) a slot after them.",
        "",
        "| slots | PSS a slot (MiB) | TTFB | worker files/s | curl --parallel | worker / curl |",
        "|---|---|---|---|---|---|",
    ]
    for slots, row in lat["by_slots"].items():
        for ms in lat["ttfb_ms"]:
            cell = row[str(ms)]
            rates = cell["files_per_s"]
            lines.append(
                f"| {slots} | {row['pss_per_slot_mib']:.1f} | {ms} ms | {fmt(rates['worker'], 1)} "
                f"| {fmt(rates['curl --parallel'], 1)} | {fmt(cell['worker_vs_curl'], 2)} |"
            )
    return "\n".join(lines) + "\n"


def plot(lat: Mapping[str, Any], docs: Path, plt: Any) -> None:
    """files/s against slots, one line per client and delay (`plt`: matplotlib.pyplot)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    slots = [int(s) for s in lat["by_slots"]]
    for ms in lat["ttfb_ms"]:
        for client, style in (("worker", "-o"), ("curl --parallel", "--x")):
            ys = [lat["by_slots"][str(s)][str(ms)]["files_per_s"][client]["median"] for s in slots]
            ax.plot(slots, ys, style, label=f"{client}, {ms} ms")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("slots (parallel downloads)")
    ax.set_ylabel("files/s (median)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(docs / PLOT, dpi=100)
    plt.close(fig)
