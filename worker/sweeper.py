"""Sweeping `.partial/`: at start and every DOWNLOAD_PARTIAL_SWEEP_INTERVAL seconds, from a thread
of the worker's main process (children come and go, and a worker may run for months). What it
removes is decided by tasks.core.sweep."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown

from download_client.arguments import PARTIAL_DIR
from download_client.settings import Settings
from tasks import parking
from tasks.core import disk, group_slots, origins
from tasks.core.sweep import sweep_partials
from worker.backend import ledger_of

ORIGIN_SWEEP_S = 1.0
UNINDEXED_SCAN_S = 600.0

log = logging.getLogger(__name__)


def connect(app: Celery, settings: Settings) -> None:
    stop = threading.Event()

    def start(**_: Any) -> None:
        stop.clear()
        threading.Thread(target=sweep_until, args=(settings, stop), daemon=True).start()

    def wake(**_: Any) -> None:
        threading.Thread(target=wake_until, args=(app, settings, stop), daemon=True).start()

    worker_ready.connect(start, weak=False, dispatch_uid="downloads-sweeper-start")
    worker_ready.connect(wake, weak=False, dispatch_uid="downloads-origin-sweeper-start")
    worker_shutdown.connect(
        lambda **_: stop.set(), weak=False, dispatch_uid="downloads-sweeper-stop"
    )


def sweep_until(settings: Settings, stop: threading.Event) -> None:
    while True:
        sweep_once(settings)
        if stop.wait(settings.partial_sweep_interval):
            return


def sweep_once(settings: Settings) -> None:
    where = settings.download_dir / PARTIAL_DIR
    try:
        removed = sweep_partials(settings.download_dir, settings.partial_max_age)
    except Exception:  # the sweeper must outlive one bad pass (a file system hiccup)
        log.exception("sweeping %s failed; trying again next time", where)
        return
    if removed:
        log.info("removed %d abandoned files from %s", removed, where)


def wake_until(app: Celery, settings: Settings, stop: threading.Event) -> None:
    """Every second: publish the parked downloads a pause's end or a dead holder's lease freed
    a slot for (a released slot wakes its successor at once; this is for what nobody released),
    those that fit in the room a consumer freed on the volume, and those whose next attempt
    after a fault is due."""
    limited = bool(settings.host_concurrency or settings.host_limits)
    slots = origins.budget(settings.host_limit)
    groups = group_slots.budget(settings.group_limit) if settings.group_limits else None
    margin = settings.disk_margin
    volume = disk.Volume(settings.download_dir, margin) if margin is not None else None
    scan_at = 0.0
    while not stop.wait(ORIGIN_SWEEP_S):
        try:
            ledger = ledger_of(app)
            if limited:
                # The sweep reads an index; a scan of the whole keyspace, now and then, finds
                # what workers from before the index left (a fleet mid-upgrade).
                scan = time.monotonic() >= scan_at
                parking.publish(app, slots.sweep(ledger, scan))
                if scan:
                    scan_at = time.monotonic() + UNINDEXED_SCAN_S
            if groups is not None:
                parking.publish(app, groups.sweep(ledger))
            if volume is not None:
                parking.publish(app, volume.sweep(ledger))
            slots.due(ledger, lambda message: parking.publish_one(app, message))
        except Exception as exc:  # Redis away: next second
            log.debug("origin sweep skipped (%s)", exc)
