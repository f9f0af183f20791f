"""The in-progress area against real workers: `.partial/` holds only downloads in flight, and the
record of a finished file travels with the file."""

from __future__ import annotations

import json
import os
from pathlib import Path

from tasks.storage import RECORD_XATTR, Target
from tests.conftest import run, submit, wait_for


def area(download_dir: Path) -> list[str]:
    try:
        return sorted(p.name for p in (Path(download_dir) / ".partial").iterdir())
    except FileNotFoundError:
        return []


def test_submitting_again_is_answered_from_the_files_own_record(client, worker, origin, key, dest):
    url = f"{origin.url}/bytes/400000?seed={key}&key={key}"
    first = run(client, worker, url=url, dest=dest)
    again = run(client, worker, url=url, dest=dest)
    assert again["skipped"] and again["http_status"] == 304 and again["sha256"] == first["sha256"]
    assert origin.stats.for_key(key)[-1].headers["If-None-Match"] == f'"{key}-400000"'
    record = json.loads(os.getxattr(Path(worker.download_dir) / dest, RECORD_XATTR))
    assert record["url"] == url and record["sha256"] == first["sha256"]
    target = Target(Path(worker.download_dir), dest, url)
    for path in (target.part_path, target.sidecar_path, target.lock_path):
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
