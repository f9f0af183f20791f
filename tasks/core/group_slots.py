"""Per-group slots, fleet-wide: a budget (tasks/core/budgets.py) whose scopes are submitter
groups (download_client/groups.py), with the cap DOWNLOAD_GROUP_LIMITS gives a group (none by
default). A download of a capped group takes its group's slot when it is admitted, before any
slot at its origin, and gives it back before it parks for its origin: it never holds one while
parked for the other."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.core.budgets import Budget
from tasks.core.ledger import Ledger

KIND = "group"


def budget(cap_for: Callable[[str], int]) -> Budget:
    """The per-group slots, with `cap_for(group)` slots for each group (0: no limit)."""
    return Budget(KIND, cap_for)


def stats(ledger: Ledger) -> dict[str, Any]:
    """In flight per capped group (live leases), deferrals so far."""
    return ledger.budget_stats(KIND)
