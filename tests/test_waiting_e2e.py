"""Forty downloads from one origin with the default cap of 8 a origin, the origin holding its
responses open (half of each body sent, then a byte at a time until the test has looked) so the
counts stand still: Flower's task list in a browser and its `/api/tasks`, `downloads status`, the
live view, `downloads wait` and the metrics all show 8 running and 32 WAITING for a slot at the
origin, none STARTED or RETRY among those that wait; then each ends SUCCESS and says so
everywhere."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.browser import CHROMIUM, HEIGHT, WIDTH, chromium, listed_total
from tests.conftest import submit
from tests.flower_process import USER
from tests.harness import ROOT, wait_for, worker_env
from tests.terminal import Terminal

N, CAP = 40, 8
SIZE = 120_000
RUNNING = ("STARTED", "PROGRESS")


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "download_client.cli", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def in_the_browser(flower: Any, worker: str, profile: Path) -> dict[str, int | None]:
    """How many of the worker's tasks Flower's task list shows in each state, as drawn in a
    headless chromium (the list narrowed with its own search: `?worker=...&state=...`)."""
    page = f"http://{USER}:{flower.password}@127.0.0.1:{flower.port}/tasks"
    counts = {}
    for state in ("PROGRESS", "WAITING", "STARTED", "RETRY", "SUCCESS"):
        query = urllib.parse.urlencode({"worker": worker, "state": state})
        counts[state] = listed_total(chromium(f"{page}?{query}", profile, "--dump-dom"))
    return counts


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
@pytest.mark.timeout(420)
def test_forty_from_one_origin_show_8_running_and_32_waiting_everywhere(
    start_worker, client, origin, flower, redis_server, tmp_path, key, request
):
    # The origin sends half of each body, then a byte at a time until the test has looked: the
    # first wave stands still however long the looking takes.
    request.addfinalizer(lambda: origin.release(key))  # however the test ends
    w = start_worker(concurrency=16, DOWNLOAD_HOST_CONCURRENCY=str(CAP))
    env = worker_env(redis_server.url, tmp_path)
    results = [
        submit(
            client,
            w,
            url=f"{origin.url}/bytes/{SIZE}?hold={key}&seed={key}{i}",
            dest=f"{key}/{i}.bin",
        )
        for i in range(N)
    ]
    ids = {r.id for r in results}
    at = origin.url + ("" if origin.url.count(":") == 2 else ":80")

    def backend() -> Counter[str] | None:
        seen = Counter(r.state for r in results)
        return seen if seen["WAITING"] == N - CAP and sum(seen[s] for s in RUNNING) == CAP else None

    wait_for(backend, 120, "8 running and 32 waiting in the result backend")
    for r in results:
        if r.state == "WAITING":
            assert r.info["reason"] == "origin" and r.info["origin"] == at, r.info
            assert r.info["since"] > 0

    def in_flower() -> dict[str, Any] | None:
        listed = flower.get("/api/tasks").json()
        mine = {i: t for i, t in listed.items() if i in ids}
        seen = Counter(t["state"] for t in mine.values())
        return mine if seen == Counter({"PROGRESS": CAP, "WAITING": N - CAP}) else None

    shown = wait_for(in_flower, 60, "Flower to list 8 PROGRESS and 32 WAITING")
    some = next(t for t in shown.values() if t["state"] == "WAITING")
    assert json.loads(some["result"])["waiting"] == f"waiting for a slot at {at}"
    detail = flower.get(f"/api/task/info/{some['uuid']}").json()
    assert detail["state"] == "WAITING" and json.loads(detail["result"])["reason"] == "origin"
    page = flower.get(f"/task/{some['uuid']}")
    assert page.status_code == 200 and "WAITING" in page.text
    standing = {"PROGRESS": CAP, "WAITING": N - CAP, "STARTED": 0, "RETRY": 0, "SUCCESS": 0}
    wait_for(
        lambda: in_the_browser(flower, w.hostname, tmp_path / "profile") == standing,
        90,
        "the task list in a browser to show 8 PROGRESS and 32 WAITING",
    )
    shot = tmp_path / "waiting.png"
    listing = f"/tasks?{urllib.parse.urlencode({'worker': w.hostname})}"
    at_page = f"http://{USER}:{flower.password}@127.0.0.1:{flower.port}{listing}"
    chromium(at_page, tmp_path / "profile", f"--screenshot={shot}")
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", png[16:24]) == (WIDTH, HEIGHT)
    live = Terminal(env, "wait", *ids)
    live.expect(
        r"0/40 done \(0 succeeded, 0 failed\), 8 running, 32 waiting \(32 for an origin slot\)"
    )

    def status() -> dict[str, Any] | None:
        done = cli(env, "status", "--queue", w.queue, "--json")
        assert done.returncode == 0, done.stderr
        body: dict[str, Any] = json.loads(done.stdout)
        mine = [a for a in body["active"] if a["id"] in ids]
        waiting = body["waiting"]
        # This origin's count: a test before this one may have left others parked elsewhere.
        parked = waiting["origins"].get(at)
        steady = len(mine) == CAP and parked == N - CAP and waiting["queued"] == 0
        return body if steady else None

    body = wait_for(status, 60, "downloads status to show 8 active and 32 parked")
    # None of these retrying or waiting for a destination (other tests' leftovers may be listed).
    assert [d for d in body["waiting"]["destinations"] if d["id"] in ids] == []
    assert [r for r in body["retrying"] if r["id"] in ids] == []
    text = cli(env, "status", "--queue", w.queue).stdout
    assert re.search(
        r"waiting: 0 queued, \d+ parked for an origin slot, \d+ waiting for a busy", text
    )
    assert f"  {N - CAP} parked for a slot at {at}\n" in text, text

    rows = json.loads(cli(env, "wait", "--json", "--timeout", "1", *ids).stdout)
    seen = Counter(r["state"] for r in rows)
    assert seen["WAITING"] == N - CAP and sum(seen[s] for s in RUNNING) == CAP, seen
    assert all(r["waiting"]["reason"] == "origin" for r in rows if r["state"] == "WAITING")
    table = cli(env, "wait", "--timeout", "1", *ids).stdout
    assert table.count(f"waiting for a slot at {at}") == N - CAP, table
    assert flower.metric("downloads_origin_waiting", origin=at) == N - CAP

    origin.release(key)
    for r in results:
        assert r.get(timeout=120)["size"] == SIZE
    assert live.finish(60) == 0
    live.expect(r"40/40 done \(40 succeeded, 0 failed\), 0 running, 0 waiting")
    assert not re.search(r"\b(STARTED|RETRY)\b", live.text), live.text[-3000:]
    rows = json.loads(cli(env, "wait", "--json", *ids).stdout)
    assert [r["state"] for r in rows] == ["SUCCESS"] * N
    assert sum(r["result"]["waited_s"] > 0 for r in rows) >= N - CAP
    assert all(r["result"]["attempts"] == 1 for r in rows)

    def all_done_in_flower() -> bool:
        listed = flower.get("/api/tasks").json()
        return [listed[i]["state"] for i in ids if i in listed] == ["SUCCESS"] * N

    wait_for(all_done_in_flower, 60, "Flower to show every download SUCCESS")
    ended = {"PROGRESS": 0, "WAITING": 0, "STARTED": 0, "RETRY": 0, "SUCCESS": N}
    wait_for(
        lambda: in_the_browser(flower, w.hostname, tmp_path / "profile") == ended,
        90,
        "the task list in a browser to show every download SUCCESS",
    )
