"""The Celery application: `celery -A worker worker|flower` finds `app` here.

Loaded on first use, so that `worker.settings` (used by clients and the CLI) can be imported,
and report a bad setting cleanly, without building the worker's app."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["app", "settings"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        module = importlib.import_module("worker.celery_app")

        globals().update(app=module.app, settings=module.settings)
        return globals()[name]
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
