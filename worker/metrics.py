"""The two figures operators need that Flower's /metrics lacks: bytes downloaded and worker
children recycled.

Workers count them in Redis (the result backend's database, through the ledger), one hash field
per worker: the bytes after each successful download (received by that run: its size minus what
it resumed from, 0 when skipped; tasks/counters.py), and the children that exit because they
reached WORKER_MAX_TASKS_PER_CHILD or WORKER_MAX_MEMORY_PER_CHILD. Every process that creates
the app registers a collector in prometheus_client's default registry, so Flower
(`celery -A worker flower`) serves them on its own /metrics, beside flower_*:

    downloads_bytes_total{worker="celery@host"}
    downloads_worker_children_recycled_total{worker="celery@host"}

and, per origin, the downloads holding a slot there and those WAITING for one (parked), with
deferrals and pauses so far; per bandwidth budget, its rate, the bytes through it and how far
ahead it is booked (docs/metrics.md).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from billiard.pool import EX_RECYCLE
from celery import Celery
from celery.signals import worker_process_shutdown
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from download_client import records
from download_client.fleet import messages_in, queue_depth
from download_client.groups import DEFAULT_GROUP, KNOWN_GROUPS, split_group
from download_client.settings import Settings
from tasks.core import origins
from tasks.core.ledger import Ledger, running_by_group
from worker.backend import ledger_of

log = logging.getLogger(__name__)


def connect(app: Celery, settings: Settings) -> None:
    """Count into the result backend's Redis, and serve the counts from this process's
    prometheus_client registry (once per process, however many apps are made)."""

    def ledger() -> Ledger:
        return ledger_of(app)

    def count_recycled(sender: Any = None, exitcode: int | None = None, **_: Any) -> None:
        if exitcode == EX_RECYCLE:
            _count_recycled(ledger(), str(sender or "unknown"))

    worker_process_shutdown.connect(
        count_recycled, weak=False, dispatch_uid="downloads-metrics-recycled"
    )
    # Registered once a process: a second app's collector names the same series, which the
    # registry refuses (DuplicateTimeseries, a ValueError).
    with contextlib.suppress(ValueError):
        REGISTRY.register(DownloadsCollector(ledger, lambda: queued_by_group(app)))


def _count_recycled(ledger: Ledger, worker: str) -> None:
    try:
        ledger.count_recycled(worker, 1)
    except RedisError as exc:  # a metric is never worth failing a child's exit
        log.warning("could not count a recycled child of %s: %s", worker, exc)


class DownloadsCollector(Collector):
    """Reads the counters from Redis at each scrape (one round trip)."""

    def __init__(
        self, ledger: Callable[[], Ledger], queued: Callable[[], dict[str, int]] = dict
    ) -> None:
        self.ledger, self.queued = ledger, queued

    def _families(self) -> tuple[CounterMetricFamily, CounterMetricFamily]:
        return (
            CounterMetricFamily(
                "downloads_bytes",
                "Bytes received by successful downloads.fetch runs",
                labels=["worker"],
            ),
            CounterMetricFamily(
                "downloads_worker_children_recycled",
                "Worker children replaced after max tasks or max memory per child",
                labels=["worker"],
            ),
        )

    def describe(self) -> Iterator[CounterMetricFamily]:
        yield from self._families()  # names only: registering must not touch Redis

    def collect(self) -> Iterator[CounterMetricFamily]:
        families = self._families()
        ledger = self.ledger()
        try:
            counts = ledger.totals()
        except RedisError as exc:
            log.warning("downloads metrics unavailable: %s", exc)
            return
        for family, values in zip(families, counts, strict=True):
            for worker, value in sorted(values.items()):
                family.add_metric([_text(worker)], float(value))
            yield family
        yield from _origin_families(ledger)
        yield from _group_families(ledger, self.queued)
        yield from _bandwidth_families(ledger)
        yield from _disk_families(ledger)


def _origin_families(ledger: Ledger) -> Iterator[Any]:
    """Per origin: downloads holding a slot now, deferrals and pauses so far."""
    try:
        seen = origins.stats(ledger)
    except RedisError as exc:
        log.warning("origin metrics unavailable: %s", exc)
        return
    flight = GaugeMetricFamily(
        "downloads_origin_in_flight", "Downloads holding a slot at the origin", labels=["origin"]
    )
    for origin, n in sorted(seen["in_flight"].items()):
        flight.add_metric([origin], float(n))
    yield flight
    try:
        parked = records.parked(ledger.client)
    except RedisError as exc:
        log.warning("parked downloads unavailable: %s", exc)
        parked = {}
    waiting = GaugeMetricFamily(
        "downloads_origin_waiting",
        "Downloads WAITING for a slot at the origin (parked)",
        labels=["origin"],
    )
    for origin, n in sorted(parked.items()):
        waiting.add_metric([origin], float(n))
    yield waiting
    for kind, text in (("deferrals", "parked for a slot"), ("pauses", "paused by Retry-After")):
        family = CounterMetricFamily(
            f"downloads_origin_{kind}", f"Times a download was {text}", labels=["origin"]
        )
        for key, n in sorted(seen["counts"].items()):
            if key.startswith(kind + " "):
                family.add_metric([key.split(" ", 1)[1]], float(n))
        yield family


def _bandwidth_families(ledger: Ledger) -> Iterator[Any]:
    """Per bandwidth budget used so far (an origin, or `worker <hostname>`): its rate, the
    bytes it let through, and how far ahead of now it is booked (above 0.25 s it is holding
    downloads back)."""
    families = (
        (GaugeMetricFamily, "rate", "downloads_bandwidth_limit_bytes_per_second",
         "The budget's rate (DOWNLOAD_HOST_RATE, DOWNLOAD_HOST_RATES, DOWNLOAD_WORKER_RATE)"),
        (CounterMetricFamily, "bytes", "downloads_bandwidth_bytes",
         "Bytes the budget let through"),
        (GaugeMetricFamily, "ahead_s", "downloads_bandwidth_booked_ahead_seconds",
         "How far ahead of now the budget is booked; above 0.25 it holds downloads back"),
    )  # fmt: skip
    yield from _per_scope(records.bandwidth, ledger, "bandwidth", "scope", families)


def _disk_families(ledger: Ledger) -> Iterator[Any]:
    """Per volume of the disk reservations: its free space and margin as last measured, the
    bytes reserved and not yet written, and the downloads waiting for room there."""
    families = (
        (GaugeMetricFamily, "free", "downloads_disk_free_bytes",
         "Bytes free on the volume, as last measured"),
        (GaugeMetricFamily, "margin", "downloads_disk_margin_bytes",
         "Bytes never reserved (DOWNLOAD_DISK_MARGIN)"),
        (GaugeMetricFamily, "reserved", "downloads_disk_reserved_bytes",
         "Bytes reserved and not yet written"),
        (GaugeMetricFamily, "waiting", "downloads_disk_waiting",
         "Downloads WAITING for room on the volume"),
    )  # fmt: skip
    yield from _per_scope(records.disks, ledger, "disk reservation", "volume", families)


def _per_scope(
    read: Callable[[Any], dict[str, dict[str, Any]]],
    ledger: Ledger,
    what: str,
    label: str,
    families: tuple[tuple[Any, str, str, str], ...],
) -> Iterator[Any]:
    """One family per (kind, field, name, help), a sample per scope `read` finds in Redis."""
    try:
        scopes = read(ledger.client)
    except RedisError as exc:
        log.warning("%s metrics unavailable: %s", what, exc)
        return
    for kind, field, name, text in families:
        family = kind(name, text, labels=[label])
        for scope, figures in scopes.items():
            family.add_metric([scope], float(figures.get(field, 0)))
        yield family


def _group_families(ledger: Ledger, queued: Callable[[], dict[str, int]]) -> Iterator[Any]:
    """Per submitter group: downloads queued (in its group queues), parked (for an origin slot
    or its cap) and running (holding a slot: download_client/groups.py)."""
    readers = (
        ("queued", "queued in the group's queues", queued),
        ("parked", "WAITING for a slot at an origin or of their group's cap (parked)",
         lambda: records.parked_by_group(ledger.client)),
        ("running", "running (holding a slot at an origin or of the group's cap)",
         lambda: running_by_group(ledger.client)),
    )  # fmt: skip
    for name, text, read in readers:
        try:
            counts = read()
        except Exception as exc:  # a broker or Redis away: this family waits, the rest is served
            log.warning("group metrics (%s) unavailable: %s", name, exc)
            continue
        family = GaugeMetricFamily(f"downloads_group_{name}", f"Downloads {text}", labels=["group"])
        for group, n in sorted(counts.items()):
            family.add_metric([group], float(n))
        yield family


def queued_by_group(app: Celery) -> dict[str, int]:
    """Group -> messages in its group queues (every queue's), on the app's broker; the default
    group's are those of the queues the groups are of and of the default queue, lanes included."""
    client = ledger_of(app).client
    names = [_text(n) for n in client.smembers(KNOWN_GROUPS)]
    homes = {split_group(n)[0] for n in names} | {app.conf.task_default_queue}
    counts: dict[str, int] = {}
    with app.connection_for_read() as conn:
        conn.ensure_connection(max_retries=1)
        for name in names:
            group = split_group(name)[1]
            counts[group] = counts.get(group, 0) + messages_in(conn, name)
        counts[DEFAULT_GROUP] = sum(queue_depth(conn, home) for home in sorted(homes))
    return counts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
