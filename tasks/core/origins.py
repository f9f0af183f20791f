"""Per-origin slots and pauses, fleet-wide: the first instance of a budget (tasks/core/budgets.py).

Each origin (scheme, host, port) is a scope of the "origin" budget, with the cap
DOWNLOAD_HOST_CONCURRENCY (or its DOWNLOAD_HOST_LIMITS override). A download takes a slot at each
hop's origin before it asks (redirects included), parks its message when there is none, and
pauses the origin for the whole fleet when the origin answers 429 or 503 with Retry-After."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from tasks.core.budgets import Budget
from tasks.core.ledger import Ledger

KIND = "origin"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def budget(cap_for: Callable[[str], int]) -> Budget:
    """The per-origin slots, with `cap_for(origin)` slots at each origin."""
    return Budget(KIND, cap_for)


def stats(ledger: Ledger) -> dict[str, Any]:
    """In flight per origin (live leases), deferrals and pauses so far."""
    return ledger.budget_stats(KIND)
