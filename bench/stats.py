"""Medians with their range, and how the report prints them."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

Summary = dict[str, float]


def summary(values: Sequence[float]) -> Summary:
    """Median, min, max and count of several runs."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def ratios(top: Sequence[float], bottom: Sequence[float]) -> Summary:
    """Run-by-run ratios (run i of one against run i of the other), summarised."""
    return summary([a / b for a, b in zip(top, bottom, strict=True)])


def fmt(s: Mapping[str, Any] | None, digits: int = 0) -> str:
    """`845 (790-870)`; a single run prints alone."""
    if not s:
        return "n/a"
    median = f"{s['median']:,.{digits}f}"
    if s["n"] < 2 or s["min"] == s["max"]:
        return median
    return f"{median} ({s['min']:,.{digits}f}-{s['max']:,.{digits}f})"
