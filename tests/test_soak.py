"""The soak's machinery kept from rotting: its judge fails what it must fail, and a run of a few
seconds (real workers, a crashable Redis, the chaos driver) accounts for every download.
`make soak` is the real run."""

from __future__ import annotations

import json
from types import SimpleNamespace

from soak.__main__ import report_stem
from soak.origin import Ledger, Outages, Transfer
from soak.plan import CASES, Download, plan
from soak.report import judge, markdown, runs_table
from soak.run import MiB, Outcome, Size, main

PLAIN = CASES[0]


def _judge(
    ended: dict[str, Outcome],
    transfers: list[Transfer],
    d: Download | None = None,
    events: list | None = None,
) -> dict:
    d = d or Download(0, PLAIN, 1000)
    ledger = Ledger()
    for t in transfers:
        ledger.add(t)
    books = SimpleNamespace(accepted={"t0": d}, ended=ended, submit_retries=0)
    size = SimpleNamespace(downloads=1, big=MiB)
    return judge(books=books, ledger=ledger, events=events or [], rss={}, partial_left=[],
                 timings={"chaos_s": 0, "drain_s": 0}, size=size, seed=0)  # fmt: skip


def _transfer(start: float, end: float, sent: int) -> Transfer:
    return Transfer("d0", start, status=200, length=1000, body_bytes=sent, end=end)


def test_the_judge_counts_a_download_that_never_ended():
    figures = _judge({}, [])
    assert not figures["ok"] and figures["accounted"] == 0


def test_the_judge_sees_two_writers_at_once():
    ok = Outcome("SUCCESS", {}, file_ok=True)
    figures = _judge({"t0": ok}, [_transfer(0, 2, 1000), _transfer(1, 3, 1000)])
    assert not figures["ok"] and len(figures["double_writers"]) >= 1


def test_the_judge_calls_a_second_whole_body_needless():
    ok = Outcome("SUCCESS", {}, file_ok=True)
    figures = _judge({"t0": ok}, [_transfer(0, 1, 1000), _transfer(2, 3, 1000)])
    assert figures["needless"] == 1 and not figures["ok"]
    # What the report keeps to find out why: the download and each of its transfers.
    [detail] = figures["needless_detail"]
    assert detail["case"] == PLAIN.name and detail["ended"] == "SUCCESS"
    assert detail["transfers"] == [
        "0.00-1.00 s: 200, 1000 of 1000",
        "2.00-3.00 s: 200, 1000 of 1000",
    ]


def test_a_whole_body_fetched_again_after_its_child_was_killed_as_it_arrived_is_not_needless():
    ok = Outcome("SUCCESS", {}, file_ok=True)
    transfers = [_transfer(0, 1, 1000), _transfer(2, 3, 1000)]
    # Within 0.5 s of its end, or 0.1 s before its start (the request on its way), or not.
    for at, needless in ((1.2, 0), (0.5, 0), (-0.05, 0), (2.5, 1), (-0.5, 1)):
        kill = SimpleNamespace(at=at, kind="child SIGKILLed", end=0.0, detail="w pid 1")
        figures = _judge({"t0": ok}, transfers, events=[kill])
        assert figures["needless"] == needless, at
        # Either way the report names the download, to be checked by hand.
        listed = figures["needless_detail"] or figures["killed_as_it_arrived_detail"]
        assert [x["case"] for x in listed] == [PLAIN.name]


def test_the_judge_names_the_cause_of_a_transfer_after_a_cut():
    ok = Outcome("SUCCESS", {}, file_ok=True)
    figures = _judge({"t0": ok}, [_transfer(0, 1, 300), _transfer(2, 3, 1000)])
    assert figures["ok"] and figures["extra_full_transfers"]


def test_a_resized_run_has_a_report_of_its_own_listed_in_the_default_one(tmp_path):
    assert report_stem({}, "redis") == "soak"
    assert report_stem({"SOAK_DOWNLOADS": "10000"}, "rabbitmq") == "soak-10000-rabbitmq"
    assert report_stem({"SOAK_QUICK": "1", "SOAK_DOWNLOADS": "10000"}, "redis") == "soak-last"
    assert report_stem({"SOAK_REDIS_KILLS": "1"}, "redis") == "soak-redis-kills"
    assert report_stem({"SOAK_DISK_MARGIN": "1Gi", "SOAK_QUICK": "1"}, "redis") == "soak-disk-redis"
    ok = Outcome("SUCCESS", {}, file_ok=True)
    figures = _judge({"t0": ok}, [_transfer(0, 1, 1000)])
    for n, broker in ((2, "redis"), (5, "rabbitmq")):
        run = {**figures, "accepted": n, "accounted": n, "broker": broker}
        (tmp_path / f"soak-{n}-{broker}.json").write_text(json.dumps(run, default=str))
    (tmp_path / "soak-redis-kills.json").write_text(json.dumps(figures, default=str))
    table = runs_table(tmp_path)
    rows = [line for line in table if line.startswith("| [")]
    assert [r.split("|")[1].strip() for r in rows] == [
        "[soak-5-rabbitmq](soak-5-rabbitmq.md)",
        "[soak-2-redis](soak-2-redis.md)",
    ]
    assert "| rabbitmq | 5 | 100.00 % | 0 | 0 | 0 |" in rows[0]
    assert markdown(figures, table).endswith("\n".join(table))


def test_the_down_origin_is_down_then_up_in_a_cycle_and_its_deadline_outlasts_an_outage(
    monkeypatch,
):
    for var in ("SOAK_QUICK", "SOAK_DOWNLOADS", "SOAK_REDIS_KILLS"):
        monkeypatch.delenv(var, raising=False)
    outages = Outages(*Size.from_env().origin_down)
    assert [outages.down(t) for t in (0, 89.9, 90, 134.9, 135, 224.9, 225)] == [
        True, True, False, False, True, True, False,
    ]  # fmt: skip
    assert outages.deadline_s == 225
    monkeypatch.setenv("SOAK_QUICK", "1")
    quick = Outages(*Size.from_env().origin_down)
    assert (quick.down_s, quick.up_s, quick.deadline_s) == (20, 10, 50)


def test_the_down_origins_downloads_have_the_deadline_and_must_succeed():
    down = [d for d in plan(400, seed=1, big=8 * MiB, deadline=225) if d.case.deadline]
    assert down and all(d.kwargs("http://o")["deadline"] == 225 for d in down)
    failed = Outcome("FAILURE", {"exc_message": "HTTP 503, gave up at the deadline"})
    figures = _judge({"t0": failed}, [], down[0])
    assert not figures["ok"] and figures["unaccounted"]
    assert figures["down_origin"]["downloads"] == 1 and figures["down_origin"]["success"] == 0
    assert "**0** of 1 downloads with a deadline ended SUCCESS" in markdown(figures)
    del figures["down_origin"]  # a report without the figure is drawn without its line
    assert "downloads with a deadline" not in markdown(figures)


def test_a_short_soak_accounts_for_every_download():
    size = Size(24, submit_s=4, chaos_s=8, outage=(1, 2), pause=(1, 2), big=5 * MiB, drain_s=120)
    figures = main(size, seed=7)
    assert figures["accepted"] == 24
    assert figures["ok"], figures
