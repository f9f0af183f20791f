"""The in-progress area against real workers: `.partial/` holds only downloads in flight, the
record of a finished file travels with the file, and a periodic sweep removes what a killed
process left, never what a running download uses."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tasks.core.records import RECORD_XATTR
from tasks.core.storage import LOCKS, Target
from tests.conftest import partial_of, run, submit
from tests.harness import wait_for
from tests.server import body_sha256


def area(download_dir: Path) -> list[str]:
    try:
        return sorted(
            p.name for p in (Path(download_dir) / ".partial").iterdir() if p.name != LOCKS
        )
    except FileNotFoundError:
        return []


def age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def test_submitting_again_is_answered_from_the_files_own_record(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/400000?seed={key}&key={key}"
    first = run(client, worker, url=url, dest=dest)
    again = run(client, worker, url=url, dest=dest)
    assert again["skipped"] and again["http_status"] == 304 and again["sha256"] == first["sha256"]
    assert origin.stats.for_key(key)[-1].headers["If-None-Match"] == f'"{key}-400000"'
    record = json.loads(os.getxattr(Path(worker.download_dir) / dest, RECORD_XATTR))
    assert record["url"] == url and record["sha256"] == first["sha256"]
    target = Target(Path(worker.download_dir), dest, url)
    for path in (target.part_path, target.sidecar_path):
        assert not path.exists(), path


def test_after_mixed_outcomes_the_idle_area_is_empty(client, start_worker, origin, key):
    w = start_worker()
    big = f"{origin.url}/bytes/600000"
    cut = f"{origin.url}/bytes/1000000?cut=300000&cut_times=1"
    jobs = [
        *({"url": f"{origin.url}/bytes/3000?seed={key}{i}"} for i in range(6)),
        *({"url": f"{big}?seed={key}b{i}"} for i in range(2)),
        *({"url": f"{origin.url}/bytes/10?status=404&seed={i}"} for i in range(2)),
        *({"url": f"{big}?seed={key}s{i}", "sha256": "0" * 64} for i in range(2)),
        *({"url": f"{cut}&seed={key}c{i}&key={key}c{i}"} for i in range(2)),
        {"url": f"{big}?seed={key}&cut=100000&key={key}-always-cut"},  # resumes, then gives up
        {"url": f"{origin.url}/bytes/10?clen=-5&seed={key}"},
        {"url": f"{origin.url}/bytes/10?status=500&seed={key}"},
        {"url": f"{origin.url}/bytes/50000?short=100&seed={key}"},
        *({"url": f"{big}?seed={key}d{i}", "dest": "one-dest.bin"} for i in range(2)),
    ]
    assert len(jobs) == 20
    results = [submit(client, w, **job) for job in jobs]
    for res in results:
        res.get(timeout=60, propagate=False)
    states = [res.state for res in results]
    assert states.count("SUCCESS") == 12 and states.count("FAILURE") == 8, states
    assert [r.result["resumed_from"] for r in results[12:14]] == [300000, 300000]
    again = run(client, w, **jobs[6])
    assert again["skipped"] and again["http_status"] == 304
    wait_for(lambda: area(w.download_dir) == [], 30, f"an empty .partial/: {area(w.download_dir)}")


def test_a_running_worker_sweeps_what_was_abandoned(client, start_worker):
    w = start_worker(DOWNLOAD_PARTIAL_SWEEP_INTERVAL="0.2")
    partial = Path(w.download_dir) / ".partial"
    partial.mkdir(exist_ok=True)
    for round_ in ("a", "b"):  # the second round needs a sweep after the first: it repeats
        planted = [partial / f"{round_}{n}" for n in ("1.part", "1.json", "2.json", "3.json.tmp")]
        planted.append(partial / f"{round_}4.lock")
        for path in planted:
            path.write_bytes(b"x")
            os.utime(path, (0, 0))
        wait_for(lambda: not any(p.exists() for p in planted), 30, f"round {round_} swept")  # noqa: B023
    assert "abandoned files from" in w.log()


def test_a_sweep_never_removes_a_download_in_progress(client, start_worker, origin, key):
    """The partial is created, then the origin stalls: it looks abandoned (untouched for longer
    than DOWNLOAD_PARTIAL_MAX_AGE) while sweeps run, but its task holds it."""
    w = start_worker(
        DOWNLOAD_PARTIAL_SWEEP_INTERVAL="0.2",
        DOWNLOAD_PARTIAL_MAX_AGE="1",
        DOWNLOAD_READ_TIMEOUT="10",
    )
    url = f"{origin.url}/bytes/600000?seed={key}&stall=3&key={key}"
    res = submit(client, w, url=url, dest="slow.bin")
    part = partial_of(w.download_dir, "slow.bin", url)
    wait_for(part.exists, 30, "the partial")
    wait_for(lambda: age(part) > 1.3 or not part.exists(), 30, "the partial to look abandoned")
    assert part.exists(), "the partial of a running download was removed"
    marker = Path(w.download_dir) / ".partial/idle.lock"
    marker.write_bytes(b"")
    wait_for(lambda: not marker.exists(), 30, "a sweep while the partial looks abandoned")
    assert part.exists() and part.with_suffix(".json").exists() and not res.ready()
    result = res.get(timeout=30)
    assert result["attempts"] == 1 and result["sha256"] == body_sha256(600000, key)
    assert len(origin.stats.for_key(key)) == 1
