"""A cancelled download leaves nothing behind: once the killed child has let go of the
destination's lock, its partial file and sidecar are removed, its claim on the destination is
given up so that waiting tasks go on at once, and a slot or disk reservation kept for it (it was
woken from a wait, then revoked before it ran) goes to the next one waiting there. This runs in
the worker's main process, which must keep consuming: the work is done in a thread."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import task_revoked

from download_client import arguments
from download_client.arguments import DownloadRequest
from download_client.contract import TASK_NAME
from download_client.errors import DownloadError, PermanentError
from download_client.settings import Settings
from tasks import parking
from tasks.core import claims, disk, group_slots, origins
from tasks.core.budgets import WOKEN, Budget
from tasks.core.storage import Target
from tasks.deliveries import REDIS_ERRORS
from worker.backend import ledger_of

log = logging.getLogger(__name__)


def connect(app: Celery, settings: Settings) -> None:
    def revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
        if getattr(sender, "name", None) != TASK_NAME:
            return
        try:
            args = arguments.parse(tuple(request.args or ()), request.kwargs or {})
        except (PermanentError, AttributeError):
            return
        kept = str((getattr(request, "headers", None) or {}).get(parking.WOKEN_FOR) or "")
        work = (app, settings, args, request.id, kept)
        threading.Thread(target=clean_up, args=work, name="discard-revoked", daemon=True).start()

    task_revoked.connect(revoked, weak=False, dispatch_uid="downloads-revoked")


def clean_up(
    app: Celery, settings: Settings, args: DownloadRequest, task_id: str, kept: str = ""
) -> None:
    target = Target(settings.download_dir, args.dest, args.url)
    try:
        with target.locked(wait=settings.time_limit):
            target.discard()
    except (DownloadError, OSError) as exc:
        log.warning("could not remove the partial of revoked task %s: %s", task_id, exc)
    try:
        ledger_of(app).release_claim(claims.claim(args, task_id, 0))
    except REDIS_ERRORS as exc:
        log.warning("claim of revoked task %s not released (%s)", task_id, exc)
    kind, _, scope = kept.partition(" ")
    budget = _budget(settings, kind)
    lease = budget.lease(scope, f"{WOKEN}{task_id}", task_id) if budget and scope else None
    if lease is None:
        return
    try:
        parking.publish(app, ledger_of(app).release(lease))
    except REDIS_ERRORS as exc:  # its lease ends on its own
        log.warning("%s kept for revoked task %s not given back (%s)", kept, task_id, exc)


def _budget(settings: Settings, kind: str) -> Budget | None:
    """The budget a woken message's slot was kept in, as this worker's settings make it."""
    if kind == origins.KIND:
        return origins.budget(settings.host_limit)
    if kind == group_slots.KIND:
        return group_slots.budget(settings.group_limit)
    if kind == disk.KIND and settings.disk_margin is not None:
        return disk.Volume(settings.download_dir, settings.disk_margin).budget()
    return None
