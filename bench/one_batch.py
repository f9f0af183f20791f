"""One batch as a whole process, to compare two builds of the service (run it from each
checkout, under `/usr/bin/time -v` or any tool that times whole commands): a private Redis, one
worker of 2 children with the benchmark's settings (8 slots per origin), and N downloads of
16 KiB from an origin that answers at once, submitted through the Python client with no group,
from the first send to the last result. `python -m bench.one_batch [N] [VAR=VALUE ...]` (2,000
by default; the worker's settings overridden by the pairs, as `DOWNLOAD_DISK_MARGIN=1Gi` to
price disk reservations) prints the batch's own wall time and files per second."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from bench.delayed import DelayedOrigin
from bench.stack import Stack, wait_all
from download_client.client import submit_many


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    overrides = dict(pair.split("=", 1) for pair in sys.argv[2:])
    work = Path(tempfile.mkdtemp(prefix="one-batch-"))
    origin = DelayedOrigin()
    try:
        with Stack(work) as stack:
            w = stack.worker("batch", **overrides)
            base = origin.url(0, 16 * 1024)
            items = [{"url": f"{base}/f{i}", "dest": f"batch/{i}"} for i in range(n)]
            began = time.monotonic()
            wait_all(submit_many(stack.client, items, queue=w.queue), timeout=600)
            took = time.monotonic() - began
            print(f"{n} downloads in {took:.2f} s: {n / took:.0f} files/s")
    finally:
        origin.stop()


if __name__ == "__main__":
    main()
