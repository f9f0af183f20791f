"""The benchmark's own code, without measuring anything: the report from made-up figures, and the
profile parser on a made-up py-spy output. (`make bench` itself is the real check.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import profile, report
from bench.stats import fmt, ratios, summary


def _s(*values: float) -> dict[str, float]:
    return summary(list(values))


def _latency_cell(worker: float, curl: float) -> dict[str, Any]:
    return {
        "files_per_s": {"worker": _s(worker), "curl --parallel": _s(curl)},
        "worker_vs_curl": ratios([worker], [curl]),
    }


def _memory_of(pss: float) -> dict[str, float]:
    return {"pss_per_slot_mib": pss, "uss_per_child_mib": 7.0, "private_dirty_per_child_mib": 6.5}


def fake_results() -> dict[str, Any]:
    variant = {
        "key": "a",
        "label": "this worker",
        "downloads": 400,
        "samples": [{"downloads": 0, "rss": [50.0, 50.1]}, {"downloads": 400, "rss": [51.0, 51.2]}],
        "idle_mib": [50.0, 50.1],
        "growth_from_idle_mib": [1.0, 1.1],
        "growth_after_first_batch_mib": [0.0, 0.1],
        "children_seen": 2,
        "connections": 2,
        "time_wait": 0,
        "cpu_ms_per_download": 2.0,
        "parent_cpu_ms_per_download": 1.0,
        "downloads_per_s": 300.0,
        "parent_peak_mib": 60.0,
        "final_max_mib": 51.2,
        "recycle_kib": 0,
    }
    anti = {**variant, "key": "b", "label": "anti", "connections": 400, "time_wait": 400}
    on = {**variant, "key": "c-on", "label": "leak, on", "growth_from_idle_mib": []}
    off = {**variant, "key": "c-off", "label": "leak, off", "children_seen": 5}
    return {
        "machine": {
            "date": "2026-01-01 00:00 UTC",
            "nproc": 2,
            "cpu": "cpu",
            "memory_gib": 24,
            "kernel": "6",
            "python": "3.11",
            "packages": {"celery": "5.7.0"},
            "tools": {"curl": "curl 8"},
            "load_at_start": "0 0 0",
        },
        "config": {"quick": True},
        "load_at_end": "1 1 1",
        "duration_s": 60.0,
        "memory": {"downloads": 400, "batch": 200, "variants": [variant, anti, off, on]},
        "large": {
            "bytes": 2**30,
            "runs": 2,
            "memory": "warm",
            "missing": ["wget"],
            "mb_per_s": {
                "worker": _s(700, 720),
                "curl": _s(800, 900),
                "curl + fsync": _s(400, 500),
                "dd + fsync": _s(720, 760),
            },
            "peak_rss_mib": {
                "worker": _s(60, 61),
                "curl": _s(10, 10),
                "curl + fsync": _s(10, 10),
                "dd + fsync": _s(3, 3),
            },
            "rss_growth_mib": {"worker": _s(3, 4)},
            "worker_vs": {
                "curl": ratios([700, 720], [800, 900]),
                "curl + fsync": ratios([700, 720], [400, 500]),
                "dd + fsync": ratios([700, 720], [720, 760]),
            },
            "raw": {"worker": [700, 720], "curl": [800, 900]},
        },
        "small": {
            "files": 100,
            "runs": 2,
            "missing": [],
            "files_per_s": {"worker": _s(300, 310), "no-op task": _s(500, 520)},
            "connections": {"worker": _s(2, 2), "no-op task": _s(0, 0)},
            "worker_vs_noop": ratios([300, 310], [500, 520]),
            "worker_vs": {"no-op task": ratios([300, 310], [500, 520])},
            "cpu_ms_per_task": {
                "worker": {"child": _s(2.5), "main": _s(2.0), "redis": _s(0.4)},
                "no-op task": {"child": _s(1.0), "main": _s(2.0), "redis": _s(0.3)},
            },
            "cpu_vs_noop": {
                "child": ratios([2.5], [1.0]),
                "main": ratios([2.0], [2.0]),
                "redis": ratios([0.4], [0.3]),
            },
        },
        "latency": {
            "rounds": 1,
            "ttfb_ms": [20, 100],
            "by_slots": {
                str(slots): {
                    "pss_per_slot_mib": 60.0 / slots,
                    "idle": _memory_of(48.0 / slots),
                    "after": _memory_of(60.0 / slots),
                    "20": _latency_cell(40.0 * slots, 45.0 * slots),
                    "100": _latency_cell(9.0 * slots, 10.0 * slots),
                }
                for slots in (2, 8)
            },
        },
        "seed": {
            "images": 200,
            "bytes": 200 * 1024,
            "ttfb_ms": 50,
            "cap": 8,
            "rounds": 1,
            "files_per_s": {"worker": _s(120.0), "curl --parallel": _s(150.0)},
            "worker_vs_curl": ratios([120.0], [150.0]),
        },
        "live_view": {
            "downloads": 300,
            "slots": 8,
            "bytes": 200_000,
            "rate": 100_000,
            "terminal": {"cpu_s": 2.4, "wall_s": 80.0, "cpu_share": 0.03},
            "pipe": {"cpu_s": 1.6, "wall_s": 80.0, "cpu_share": 0.02},
        },
        "profile": {
            **profile.summarise(profile.parse(COLLAPSED)),
            "downloads": 10,
            "hashing": {"1024 KiB chunks": 1700.0},
            "hashing_reading": "ok.",
            "progress": {
                "check_ns": 100.0,
                "report_ms": 0.5,
                "reports_per_gib": 3.0,
                "share_per_gib": 0.001,
                "every_chunk_ms_per_gib": 512.0,
            },
        },
    }


_T = "trace_task (/v/site-packages/celery/app/trace.py:400)"
_F = f"run ({profile.ROOT}tasks/fetch.py:50)"
_R = "execute (/v/site-packages/redis/client.py:10)"
COLLAPSED = f"""\
process 1:"celery";{_T};{_F};download ({profile.ROOT}tasks/core/transfer.py:70) 30
process 1:"celery";{_T};{_F};count ({profile.ROOT}tasks/deliveries.py:30);{_R} 10
process 1:"celery";{_T};store_result (/v/site-packages/celery/backends/base.py:5) 20
"""


def test_profile_parser_names_the_path() -> None:
    figures = profile.summarise(profile.parse(COLLAPSED))
    assert figures["samples"] == 60
    shares = dict(figures["path"])
    assert shares["run (tasks/fetch.py)"] == 40 / 60
    layers = dict(figures["layers"])
    assert layers["this project: tasks/, worker/ (disk calls included)"] == 30 / 60


def test_report_renders_targets_and_sections(tmp_path: Path) -> None:
    text = report.render(fake_results(), plotted=False)
    durable = "1 GiB: speed against the durable limit (the same bytes written with fsync)"
    assert f"| {durable} | >= 0.9 x | 0.96 (0.95-0.97) x | met |" in text
    assert "| 1 GiB: child RSS over its idle RSS | <= 16 MiB |" in text
    assert "files/s against the no-op task | >= 0.65 x | 0.60 (0.60-0.60) x | **missed** |" in text
    # The profile beside the earlier one kept in bench/profile_before.json, layer by layer.
    assert "| layer | share then | share now |" in text
    assert "| this project: tasks/, worker/ (disk calls included) | 32% |" in text
    # The three 1 GiB ratios, read together in one paragraph.
    assert "0.96 (0.95-0.97) x the durable limit" in text and "x plain `curl`" in text
    for heading in ("## 1.", "## 2.", "## 3.", "## 4.", "## 5.", "## 6."):
        assert heading in text
    assert "Not measured (not installed): wget." in text
    assert report.write(fake_results(), tmp_path).read_text().startswith("# Benchmarks")


def test_fmt_prints_median_and_range() -> None:
    assert fmt(summary([3.0, 1.0, 2.0])) == "2 (1-3)"
    assert fmt(summary([2.5]), 1) == "2.5"
    assert fmt(None) == "n/a"


def test_latency_section_has_a_row_per_slots_and_delay(tmp_path: Path) -> None:
    text = report.render(fake_results(), plotted=False)
    assert "| 8 | 6.0 -> 7.5 | 7.0 -> 7.0 | 6.5 -> 6.5 | 100 ms | 72.0 | 80.0 | 0.90 |" in text
    assert "| 2 | 24.0 -> 30.0 | 7.0 -> 7.0 | 6.5 -> 6.5 | 20 ms | 80.0 | 90.0 | 0.89 |" in text


def test_latency_section_of_an_older_report_has_no_idle_figures() -> None:
    results = fake_results()
    for row in results["latency"]["by_slots"].values():
        del row["idle"], row["after"]
    text = report.render(results, plotted=False)
    assert "| 8 | 7.5 | - | - | 100 ms | 72.0 | 80.0 | 0.90 |" in text


def test_small_section_splits_cpu_a_task_by_process() -> None:
    text = report.render(fake_results(), plotted=False)
    assert "| child | 2.50 | 1.00 | 2.50 |" in text
    assert "| redis | 0.40 | 0.30 | 1.33 |" in text


def test_seed_section_against_curl() -> None:
    text = report.render(fake_results(), plotted=False)
    assert "| worker | 120.0 | 0.80 |" in text
    assert "| curl --parallel --parallel-max 8 | 150.0 | |" in text


def test_latency_plot_is_drawn(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")  # the `bench` extra
    report.write(fake_results(), tmp_path)
    assert (tmp_path / "bench-latency.png").stat().st_size > 0


def test_live_view_section_and_target() -> None:
    text = report.render(fake_results(), plotted=False)
    assert "| terminal | 2.40 | 80.0 | 3.0% |" in text and "| pipe | 1.60 | 80.0 | 2.0% |" in text
    target = "the command's CPU on a terminal | <= 5% of one core | 3.0% | met |"
    assert target in text


def test_targets_of_the_cpu_seed_and_32_slots() -> None:
    results = fake_results()
    row = {
        "idle": _memory_of(10.5),
        "after": _memory_of(13.5),
        "pss_per_slot_mib": 13.5,
        "20": _latency_cell(900.0, 1000.0),
        "100": _latency_cell(290.0, 310.0),
    }
    results["latency"]["by_slots"]["32"] = row
    text = report.render(results, plotted=False)
    assert "| 16 KiB: the worker child's CPU a download | <= 2.8 ms | 2.50 ms | met |" in text
    assert "against the no-op's | <= 1.1 x | 1.00 x | met |" in text
    assert "curl --parallel-max 32 | >= 0.9 x | 0.94 x | met |" in text
    assert "| 32 slots: PSS a slot, idle | <= 11 MiB | 10.5 MiB | met |" in text
    assert "| 32 slots: PSS a slot, after the runs | <= 13 MiB | 13.5 MiB | **missed** |" in text
    assert "curl --parallel-max 8 | >= 0.8 x | 0.80 x | met |" in text


def test_the_groups_part_renders_each_fleets_split():
    from bench import groups

    text = groups.render({"slots": 16, "cap": 8, "window_s": 60, "rounds": 2, "heavy_to_light": {
        "weights 3:1": _s(2.9, 3.1), "equal weights (peer)": _s(0.9, 1.1)}})  # fmt: skip
    assert "| weights 3:1 | 3.00 (2.90-3.10) |" in text, text
    assert "| equal weights (peer) | 1.00 (0.90-1.10) |" in text, text


def test_the_main_process_and_memory_are_read_against_the_long_no_op() -> None:
    results = fake_results()
    small = results["small"]
    long = "no-op task, as long as a download"
    small["cpu_ms_per_task"][long] = {"child": _s(1.1), "main": _s(1.9), "redis": _s(0.35)}
    small["hold_s"] = 0.004
    small["cpu_vs_noop_as_long"] = {
        "child": ratios([2.5], [1.1]),
        "main": ratios([2.0], [1.9]),
        "redis": ratios([0.4], [0.35]),
    }
    results["latency"]["noop"] = {
        "slots": 8,
        "tasks": 480,
        "idle": _memory_of(6.0),
        "after": _memory_of(6.5),
    }
    text = report.render(results, plotted=False)
    assert "| main | 2.00 | 2.00 | 1.00 | 1.90 | 1.05 |" in text
    assert "sleeps 4.00 ms in its child" in text
    assert "download / that no-op: 1.05 x" in text
    assert "the no-op's 6.0 -> 6.5 MiB" in text
    assert "The no-op peer (`bench.noop_as_long`" in text and "8 slots, 480 tasks" in text


def test_the_bandwidth_part_renders_the_rate_against_the_budget() -> None:
    results = fake_results()
    results["bandwidth"] = {
        "budget": 5_000_000,
        "workers": 3,
        "slots": 4,
        "downloads": 12,
        "size": 20 * 2**20,
        "warm_s": 10.0,
        "window_s": 20.0,
        "rounds": 2,
        "origin_mb_per_s": _s(5.1, 5.2),
        "rate_vs_budget": _s(1.02, 1.04),
        "other_size": 64 * 2**20,
        "other_mb_per_s": {"alone": _s(400, 420), "during": _s(390, 410)},
        "other_during_vs_alone": ratios([390, 410], [400, 420]),
    }
    text = report.render(results, plotted=False)
    assert "## 10. Bandwidth budgets" in text
    assert "| the origin's rate / the budget | 1.030 (1.020-1.040) |" in text
    assert "the origin's rate against it | within 10% | 1.030 (1.020-1.040) x | met |" in text
    results["bandwidth"]["rate_vs_budget"] = _s(1.02, 1.15)  # one round over: not met
    assert "1.085 (1.020-1.150) x | **missed** |" in report.render(results, plotted=False)
