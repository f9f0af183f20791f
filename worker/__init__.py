"""The Celery application: `celery -A worker worker|flower` finds `app` here."""

from worker.app import app, settings

__all__ = ["app", "settings"]
