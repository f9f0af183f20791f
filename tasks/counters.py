"""The bytes a finished download adds to the fleet's running totals (worker/metrics.py serves
them on Flower's /metrics; the ledger counts them with the download's last round trip)."""

from __future__ import annotations

from typing import Any


def received_bytes(result: Any) -> int:
    """Bytes a finished download received over the network in its last run."""
    if not isinstance(result, dict) or result.get("skipped"):
        return 0
    return max(0, int(result.get("size") or 0) - int(result.get("resumed_from") or 0))
