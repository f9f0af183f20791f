"""`python -m bench.origins` (run by `make bench`): the per-origin limit at work. One worker of 8
children; a slow origin (each answer starts after 0.5 s) and a fast one. With a cap of N at the
slow origin its throughput should be N slots' worth (N / 0.5 s), and the fast origin's downloads
should not wait behind it; without a cap the slow downloads take every child. Medians of 3
rounds; figures to docs/bench-origins.md."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from bench.stack import Stack
from download_client.contract import TASK_NAME
from tests.harness import Worker, worker_env
from tests.server import OriginServer

TTFB_S = 0.5
SLOW, FAST, CHILDREN, ROUNDS = 24, 40, 8, 3
DOCS = Path(__file__).resolve().parent.parent / "docs"


def _round(
    stack: Stack, w: Worker, slow: OriginServer, fast: OriginServer, n: int
) -> tuple[float, float]:
    app = stack.client
    began = time.monotonic()
    slow_res = [
        app.send_task(
            TASK_NAME,
            kwargs={
                "url": f"{slow.url}/bytes/1000?seed=s{n}{i}&stall={TTFB_S}",
                "dest": f"s{n}/{i}.bin",
            },
            queue=w.queue,
        )
        for i in range(SLOW)
    ]
    fast_res = [
        app.send_task(
            TASK_NAME,
            kwargs={"url": f"{fast.url}/bytes/1000?seed=f{n}{i}", "dest": f"f{n}/{i}.bin"},
            queue=w.queue,
        )
        for i in range(FAST)
    ]
    for r in fast_res:
        r.get(timeout=300)
    fast_s = time.monotonic() - began
    for r in slow_res:
        r.get(timeout=300)
    return SLOW / (time.monotonic() - began), fast_s


def run() -> list[dict[str, float | int]]:
    rows = []
    slow, fast = OriginServer().start(), OriginServer().start()
    work = Path(tempfile.mkdtemp(prefix="bench-origins-"))
    try:
        with Stack(work) as stack:
            for cap in (0, 2, 4):
                env = worker_env(
                    stack.redis.url, work / f"dl{cap}", DOWNLOAD_HOST_CONCURRENCY=str(cap)
                )
                w = Worker(env, f"cap{cap}", f"cap{cap}", work / f"cap{cap}.log", work / f"dl{cap}",
                           ["-c", str(CHILDREN)]).start(stack.client)  # fmt: skip
                try:
                    rounds = [_round(stack, w, slow, fast, k) for k in range(ROUNDS)]
                finally:
                    w.stop()
                rate = statistics.median(r[0] for r in rounds)
                rows.append({
                    "cap": cap,
                    "slow_files_per_s": rate,
                    "slot_worth": (cap or CHILDREN) / TTFB_S,
                    "fast_batch_s": statistics.median(r[1] for r in rounds),
                })  # fmt: skip
    finally:
        slow.stop()
        fast.stop()
    return rows


def markdown(rows: list[dict[str, float | int]]) -> str:
    lines = [
        "# Per-origin limit",
        "",
        f"One worker of {CHILDREN} children; {SLOW} downloads from an origin answering after "
        f"{TTFB_S} s and {FAST} from a fast one, submitted together; medians of {ROUNDS} rounds.",
        "",
        "| cap at the slow origin | slow files/s | N slots' worth (N / TTFB) | ratio "
        "| fast batch done after (s) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['cap'] or 'none'} | {r['slow_files_per_s']:.2f} | {r['slot_worth']:.1f} | "
            f"{float(r['slow_files_per_s']) / float(r['slot_worth']):.2f} | "
            f"{r['fast_batch_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    text = markdown(run())
    print(text)
    (DOCS / "bench-origins.md").write_text(text)
