"""Download slots: a worker started without `--concurrency` runs as many downloads at once as
WORKER_CONCURRENCY says and no more, and children replaced by recycling come back as small as
the ones the worker started with."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import submit
from tests.harness import wait_for

SLOTS = 3
MIB = 1024 * 1024


def _pss(pid: int) -> int:
    """Proportional set size in bytes: shared pages split among the processes mapping them."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no Pss line for {pid}")


def _all_pss(pids: list[int]) -> list[int] | None:
    """Every child's PSS, or None when one exited while being read (recycled meanwhile)."""
    try:
        return [_pss(pid) for pid in pids]
    except (ProcessLookupError, FileNotFoundError):
        return None


def test_the_worker_runs_as_many_downloads_at_once_as_it_has_slots(client, start_worker, origin):
    worker = start_worker(concurrency=None, WORKER_CONCURRENCY=str(SLOTS))
    assert len(worker.children()) == SLOTS
    # Slow bodies keep every slot busy long enough to see who waits.
    results = [
        submit(client, worker, url=f"{origin.url}/bytes/400000?rate=100000&seed=slot{i}")
        for i in range(SLOTS + 2)
    ]
    running = wait_for(
        lambda: (n := sum(r.state in ("STARTED", "PROGRESS") for r in results)) == SLOTS and n,
        60,
        "every slot to be busy",
    )
    assert running == SLOTS
    assert sum(r.state == "PENDING" for r in results) == 2  # queued, not started
    for r in results:
        r.get(timeout=90)


def test_recycled_children_come_back_as_small_as_the_first(client, start_worker, origin):
    # Replaced after each task: once the batches are done, every child is a new one that has
    # run nothing (with 2 a task each, a child that ran one would still hold its memory).
    worker = start_worker(concurrency=SLOTS, WORKER_MAX_TASKS_PER_CHILD="1")
    first = worker.children()
    baseline = max(wait_for(lambda: _all_pss(first), 30, "the first children"))
    for round_ in range(3):  # every child serves a task and is replaced
        batch = [
            submit(client, worker, url=f"{origin.url}/bytes/200000?seed=r{round_}x{i}")
            for i in range(SLOTS * 2)
        ]
        for r in batch:
            r.get(timeout=60)
    recycled = wait_for(lambda: _fresh_pss(worker, first), 60, "every child to be a fresh one")
    assert max(recycled) <= baseline * 1.25 + 2 * MIB, (baseline, recycled)


def _fresh_pss(worker, first: list[int]) -> list[int] | None:
    """Every child's PSS once all SLOTS children are replacements that have written no body.

    A child that ran the last task exits just after its result is stored, so it can still be
    listed when the results are in; it wrote a 200 kB body, a fresh child wrote none.
    """
    import psutil

    pids = worker.children()
    if len(pids) != SLOTS or set(pids) & set(first):
        return None
    try:
        if any(psutil.Process(p).io_counters().write_chars >= 100_000 for p in pids):
            return None
        return [_pss(p) for p in pids]
    except (psutil.NoSuchProcess, ProcessLookupError, FileNotFoundError):
        return None


def _private_share(pid: int) -> float:
    """The part of a process's resident memory that no other process shares."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    kib = {k: int(v.split()[0]) for k, v in (x.split(":", 1) for x in rollup.splitlines()[1:])}
    return (kib["Private_Clean"] + kib["Private_Dirty"]) / kib["Rss"]


def test_children_keep_sharing_the_parents_memory_after_work(client, start_worker, origin):
    worker = start_worker(concurrency=SLOTS, WORKER_MAX_TASKS_PER_CHILD="0")
    batch = [
        submit(client, worker, url=f"{origin.url}/bytes/20000?seed=share{i}")
        for i in range(SLOTS * 10)
    ]
    for r in batch:
        r.get(timeout=60)
    shares = wait_for(lambda: _all_shares(worker.children()), 30, "the children's memory maps")
    # Without the freeze of the parent's objects at fork, more than half of a child is its own.
    assert max(shares) < 0.4, shares


def _all_shares(pids: list[int]) -> list[float] | None:
    try:
        return [_private_share(pid) for pid in pids]
    except (ProcessLookupError, FileNotFoundError):
        return None
