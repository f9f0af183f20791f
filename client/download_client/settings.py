"""One typed settings object, read from the environment. Every default is documented here and in
docs/settings.md; the Celery configuration is derived from it in `worker.celery_app`;
producers read the broker, the backend and the visibility timeout."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from download_client.groups import GROUP_NAME

T = TypeVar("T")


class SettingsError(ValueError):
    """An environment variable holds a value the worker cannot run with."""


def _bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false")


def _int(raw: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ValueError("expected a whole number") from None


def _float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if value != value:  # NaN compares false with everything: no bound would refuse it
        raise ValueError("expected a number")
    return value


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if value <= 0:  # type: ignore[operator]
            raise ValueError("must be greater than 0")
        return value

    return parse


def _non_negative_float(raw: str) -> float:
    value = _float(raw)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a number of seconds, 0 or more")
    return value


def _non_negative_int(raw: str) -> int:
    value = _int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


_PARAM_NAME = re.compile(r"[^\s&=#?]+")


def _names(raw: str) -> tuple[str, ...]:
    """A comma-separated list of query parameter names (empty: none)."""
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if not _PARAM_NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a query parameter name")
    return names


def _proxy_url(raw: str) -> str:
    """An http:// or https:// proxy URL, credentials allowed (never shown: see redact_proxy)."""
    raw = raw.strip()
    if not raw:
        return ""
    parts = urlsplit(raw)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError("expected http://[user:password@]host:port or https://...")
    return raw


def _hosts(raw: str) -> tuple[str, ...]:
    """A comma-separated list of host names, domains (.example.com) or IP addresses."""
    return tuple(h.strip().lower() for h in raw.split(",") if h.strip())


def _origin_limits(raw: str) -> tuple[tuple[str, int], ...]:
    """`origin=N` pairs, comma-separated; an origin is scheme://host[:port] (default ports)."""
    return tuple(_origin_pairs(raw, _non_negative_int, "N"))


def _origin_pairs(raw: str, kind: Callable[[str], int], what: str) -> list[tuple[str, int]]:
    pairs: dict[str, int] = {}
    for item in (i.strip() for i in raw.split(",") if i.strip()):
        origin, sep, value = item.rpartition("=")
        parts = urlsplit(origin)
        if not sep or parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{item!r}: expected scheme://host[:port]={what}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        key = f"{parts.scheme}://{parts.hostname.lower()}:{port}"
        if key in pairs:
            raise ValueError(f"{key!r} is given twice")
        pairs[key] = kind(value)
    return list(pairs.items())


MIN_RATE = 64 * 1024  # a download takes at least 16 KiB at a time: 0.25 s of this rate
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?)?b?", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def _amount(raw: str, what: str, example: str, noun: str = "a size") -> int:
    """A number of bytes: a whole number, or one with a unit (5M = 5,000,000; 5Mi = 5 x 2^20;
    k, M, G and Ki, Mi, Gi, with an optional trailing B)."""
    m = _RATE.fullmatch(raw.strip())
    if m is None:
        raise ValueError(f"{raw!r}: expected {what}, e.g. {example}")
    value = float(m[1]) * _RATE_UNITS[(m[2] or "").lower()]
    if not math.isfinite(value) or value > 2**53:
        raise ValueError(f"{raw!r}: too large for {noun}")
    return round(value)


def _rate(raw: str) -> int:
    """Bytes per second (see _amount); 0 is no limit."""
    value = _amount(raw, "bytes per second", "5000000, 5M or 4Mi (0: none)", "a rate")
    if 0 < value < MIN_RATE:
        raise ValueError(f"{raw!r}: a rate is at least 64Ki (65536) bytes per second (0: none)")
    return value


MIN_DISK_STEP = 2**20


def _disk_margin(raw: str) -> int | None:
    """Bytes to keep free on DOWNLOAD_DIR's volume (see _amount); empty: no disk reservations."""
    if not raw.strip():
        return None
    return _amount(raw, "bytes to keep free", "10Gi, 500M or 0 (empty: no reservations)")


def _disk_step(raw: str) -> int:
    value = _amount(raw, "bytes", "64Mi")
    if value < MIN_DISK_STEP:
        raise ValueError(f"{raw!r}: a step is at least 1Mi (1048576) bytes")
    return value


MAX_SEGMENTS = 16


def _segments(raw: str) -> int:
    value = _int(raw)
    if not 1 <= value <= MAX_SEGMENTS:
        raise ValueError(f"{raw!r}: expected 1 (one connection) to {MAX_SEGMENTS} connections")
    return value


def _segment_min(raw: str) -> int:
    value = _amount(raw, "bytes", "64Mi")
    if value < MIN_DISK_STEP:
        raise ValueError(f"{raw!r}: segments are for bodies of at least 1Mi (1048576) bytes")
    return value


def _origin_rates(raw: str) -> tuple[tuple[str, int], ...]:
    """`origin=rate` pairs, comma-separated (the origins as in DOWNLOAD_HOST_LIMITS)."""
    return tuple(_origin_pairs(raw, _rate, "RATE"))


def _group_numbers(kind: Callable[[str], Any]) -> Callable[[str], tuple[tuple[str, Any], ...]]:
    """`group=N` pairs, comma-separated, each N read by `kind`."""

    def parse(raw: str) -> tuple[tuple[str, Any], ...]:
        pairs: dict[str, Any] = {}
        for item in (i.strip() for i in raw.split(",") if i.strip()):
            group, sep, value = item.rpartition("=")
            if not sep or not GROUP_NAME.fullmatch(group):
                raise ValueError(f"{item!r}: expected group=N (a group name: a-z, 0-9, _ and -)")
            if group in pairs:
                raise ValueError(f"{group!r} is given twice")
            pairs[group] = kind(value)
        return tuple(pairs.items())

    return parse


def _weight(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan  # refused below, with the same words
    if not (0 < value <= 1000):
        raise ValueError(f"{raw!r}: a weight is a number above 0, at most 1000")
    return value


REDIS_SCHEMES = ("redis", "rediss")
RESULTS_DB = 1


def result_backend_for(broker_url: str, result_backend: str = "") -> str:
    """Where results live, for every component (worker, Flower, client, CLI, `make run`):
    CELERY_RESULT_BACKEND when given, else database 1 of the broker's Redis (same host, port,
    credentials and options). Any other broker needs CELERY_RESULT_BACKEND: guessing a Redis the
    broker does not name would leave producers waiting on results stored nowhere they look."""
    if result_backend:
        return result_backend
    try:
        parts = urlsplit(broker_url)
    except ValueError as exc:
        raise SettingsError(f"CELERY_BROKER_URL is not a URL ({exc})") from None
    if parts.scheme.lower() not in REDIS_SCHEMES or not parts.netloc:
        # The scheme only: the URL may hold a password.
        raise SettingsError(
            "CELERY_RESULT_BACKEND is required when CELERY_BROKER_URL is not a redis:// or "
            f"rediss:// URL (it is {parts.scheme or 'without a scheme'}://...)"
        )
    return urlunsplit((parts.scheme, parts.netloc, f"/{RESULTS_DB}", parts.query, ""))


def _env(var: str, parse: Callable[[str], Any], default: str) -> Any:
    """A setting read from `var`: its parser and documented default travel with the field."""
    return field(metadata={"var": var, "parse": parse, "default": default})


@dataclass(frozen=True)
class Settings:
    """Every setting of the service; field order and variable names are the public contract."""

    broker_url: str = _env("CELERY_BROKER_URL", str, "redis://localhost:6379/0")
    # Empty: derived from the broker by result_backend_for (database 1 of the broker's Redis).
    result_backend: str = _env("CELERY_RESULT_BACKEND", str, "")
    download_dir: Path = _env("DOWNLOAD_DIR", Path, "./downloads")
    allow_private: bool = _env("DOWNLOAD_ALLOW_PRIVATE", _bool, "false")
    connect_timeout: float = _env("DOWNLOAD_CONNECT_TIMEOUT", _positive(_float), "10")
    read_timeout: float = _env("DOWNLOAD_READ_TIMEOUT", _positive(_float), "30")
    max_retries: int = _env("DOWNLOAD_MAX_RETRIES", _non_negative_int, "5")
    retry_backoff: float = _env("DOWNLOAD_RETRY_BACKOFF", _positive(_float), "2")
    retry_backoff_max: float = _env("DOWNLOAD_RETRY_BACKOFF_MAX", _positive(_float), "600")
    max_bytes: int = _env("DOWNLOAD_MAX_BYTES", _positive(_int), str(10 * 1024**3))
    chunk_size: int = _env("DOWNLOAD_CHUNK_SIZE", _positive(_int), str(128 * 1024))
    progress_interval: float = _env("DOWNLOAD_PROGRESS_INTERVAL", _positive(_float), "0.5")
    soft_time_limit: float = _env("DOWNLOAD_SOFT_TIME_LIMIT", _positive(_float), "3000")
    time_limit: float = _env("DOWNLOAD_TIME_LIMIT", _positive(_float), "3300")
    visibility_timeout: int = _env("DOWNLOAD_VISIBILITY_TIMEOUT", _positive(_int), "7200")
    max_deliveries: int = _env("DOWNLOAD_MAX_DELIVERIES", _positive(_int), "3")
    partial_max_age: int = _env("DOWNLOAD_PARTIAL_MAX_AGE", _positive(_int), str(7 * 24 * 3600))
    partial_sweep_interval: float = _env(
        "DOWNLOAD_PARTIAL_SWEEP_INTERVAL", _positive(_float), "3600"
    )
    result_expires: int = _env("DOWNLOAD_RESULT_EXPIRES", _positive(_int), str(7 * 24 * 3600))
    result_outage: float = _env("DOWNLOAD_RESULT_OUTAGE", _positive(_float), "300")
    shutdown_grace: float = _env("DOWNLOAD_SHUTDOWN_GRACE", _positive(_float), "90")
    # Downloads wait on the network, not the CPU: slots are sized for waiting, not for cores.
    concurrency: int = _env("WORKER_CONCURRENCY", _positive(_int), "16")
    max_tasks_per_child: int = _env("WORKER_MAX_TASKS_PER_CHILD", _non_negative_int, "1000")
    max_memory_per_child: int = _env("WORKER_MAX_MEMORY_PER_CHILD", _non_negative_int, "262144")
    redact_params: tuple[str, ...] = _env("DOWNLOAD_REDACT_PARAMS", _names, "")
    # TLS and egress: trust a private CA (in addition to the default set, or instead of it with
    # DOWNLOAD_CA_ONLY), a client certificate for origins that ask for one, an egress proxy.
    ca_bundle: str = _env("DOWNLOAD_CA_BUNDLE", str, "")
    ca_only: bool = _env("DOWNLOAD_CA_ONLY", _bool, "false")
    client_cert: str = _env("DOWNLOAD_CLIENT_CERT", str, "")
    client_key: str = _env("DOWNLOAD_CLIENT_KEY", str, "")
    proxy: str = _env("DOWNLOAD_PROXY", _proxy_url, "")
    no_proxy: tuple[str, ...] = _env("DOWNLOAD_NO_PROXY", _hosts, "")
    # Downloads running at once against one origin (scheme, host, port) across the whole fleet;
    # 0: no limit. Overrides per origin: "https://cdn.example.com=32,http://10.0.0.5:8080=2".
    host_concurrency: int = _env("DOWNLOAD_HOST_CONCURRENCY", _non_negative_int, "8")
    host_limits: tuple[tuple[str, int], ...] = _env("DOWNLOAD_HOST_LIMITS", _origin_limits, "")
    # Submitter groups' shares of the origins' slots, by slot time: "crawl=3,thumbs=1" (1 each by
    # default, download_client/groups.py).
    group_weights: tuple[tuple[str, float], ...] = _env(
        "DOWNLOAD_GROUP_WEIGHTS", _group_numbers(_weight), ""
    )
    # Downloads of one group running at once across the fleet: "crawl=16" (none by default).
    group_limits: tuple[tuple[str, int], ...] = _env(
        "DOWNLOAD_GROUP_LIMITS", _group_numbers(_non_negative_int), ""
    )
    # Completion callbacks: signed with the secret, sent only to hosts on the allowlist, retried
    # with backoff (doubling from 1 s, capped at 10 min) for DOWNLOAD_CALLBACK_GIVE_UP seconds.
    callback_secret: str = _env("DOWNLOAD_CALLBACK_SECRET", str, "")
    callback_allow: tuple[str, ...] = _env("DOWNLOAD_CALLBACK_ALLOW", _hosts, "")
    callback_give_up: float = _env("DOWNLOAD_CALLBACK_GIVE_UP", _positive(_float), "86400")
    callback_backoff_max: float = _env("DOWNLOAD_CALLBACK_BACKOFF_MAX", _positive(_float), "600")
    # Deadlines: a download without a `deadline` argument gets this many seconds (0: none, the
    # attempt budget DOWNLOAD_MAX_RETRIES ends it); a wait of a download with a deadline longer
    # than DOWNLOAD_PARK_AFTER (0: every wait) is parked in Redis instead of held as a countdown
    # by a worker's main process, which costs it about 12 KiB of memory a download.
    deadline: float = _env("DOWNLOAD_DEADLINE", _non_negative_float, "0")
    park_after: float = _env("DOWNLOAD_PARK_AFTER", _non_negative_float, "0")
    # Bandwidth budgets, in bytes per second (0: none): what the whole fleet takes from one
    # origin (overrides per origin: "https://cdn.example.com=20M"), and what one worker (all its
    # processes) takes in total.
    host_rate: int = _env("DOWNLOAD_HOST_RATE", _rate, "0")
    host_rates: tuple[tuple[str, int], ...] = _env("DOWNLOAD_HOST_RATES", _origin_rates, "")
    worker_rate: int = _env("DOWNLOAD_WORKER_RATE", _rate, "0")
    # Disk reservations, fleet-wide per volume (tasks/core/disk.py): on when a margin is given,
    # the bytes never reserved on DOWNLOAD_DIR's volume; a body of unknown size reserves a step
    # at a time.
    disk_margin: int | None = _env("DOWNLOAD_DISK_MARGIN", _disk_margin, "")
    disk_step: int = _env("DOWNLOAD_DISK_STEP", _disk_step, "64Mi")
    # Segmented downloads (tasks/core/segments.py): a body of at least DOWNLOAD_SEGMENT_MIN from
    # an origin with ranges is fetched over up to DOWNLOAD_SEGMENTS connections (1: never), once
    # its first connection ran a second under DOWNLOAD_SEGMENT_BELOW bytes a second (0: at once).
    segments: int = _env("DOWNLOAD_SEGMENTS", _segments, "1")
    segment_min: int = _env("DOWNLOAD_SEGMENT_MIN", _segment_min, "64Mi")
    segment_below: int = _env("DOWNLOAD_SEGMENT_BELOW", _rate, "0")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            var, parse = f.metadata["var"], f.metadata["parse"]
            raw = env.get(var, f.metadata["default"])
            try:
                values[f.name] = parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{var}={raw!r}: {exc}") from None
        values["result_backend"] = result_backend_for(
            values["broker_url"], values["result_backend"]
        )
        settings = cls(**values)
        settings.check()
        return settings

    def group_weight(self, group: str) -> float:
        return dict(self.group_weights).get(group, 1.0)

    def group_limit(self, group: str) -> int:
        """The fleet-wide cap on a group's downloads running at once (0: none)."""
        return dict(self.group_limits).get(group, 0)

    def host_limit(self, origin: str) -> int:
        """The fleet-wide cap for one origin (scheme://host:port): an override, else the default."""
        return dict(self.host_limits).get(origin, self.host_concurrency)

    def rate_limit(self, origin: str) -> int:
        """The fleet-wide bytes per second from one origin (0: none)."""
        return dict(self.host_rates).get(origin, self.host_rate)

    def check(self) -> None:
        # The result backend also holds the downloads' claims, delivery counts, slots and notes.
        backend_scheme = urlsplit(self.result_backend).scheme.lower()
        if backend_scheme not in REDIS_SCHEMES:
            raise SettingsError(
                "CELERY_RESULT_BACKEND must be a redis:// or rediss:// URL (it is "
                f"{backend_scheme or 'without a scheme'}://...): the workers keep each "
                "download's claims, counts and slots beside its result"
            )
        if self.ca_only and not self.ca_bundle:
            raise SettingsError("DOWNLOAD_CA_ONLY=true needs DOWNLOAD_CA_BUNDLE")
        if self.client_key and not self.client_cert:
            raise SettingsError("DOWNLOAD_CLIENT_KEY needs DOWNLOAD_CLIENT_CERT")
        if self.soft_time_limit >= self.time_limit:
            raise SettingsError("DOWNLOAD_SOFT_TIME_LIMIT must be below DOWNLOAD_TIME_LIMIT")
        # Redis redelivers an unacked message once the visibility timeout passes, counted from
        # delivery: a running task or a retry waiting its countdown would run twice (celery#5935).
        if self.visibility_timeout <= self.time_limit + self.retry_backoff_max:
            raise SettingsError(
                "DOWNLOAD_VISIBILITY_TIMEOUT must exceed DOWNLOAD_TIME_LIMIT + "
                "DOWNLOAD_RETRY_BACKOFF_MAX, or Redis hands running downloads to a second worker"
            )


def documented() -> list[tuple[str, str]]:
    """(variable, default) pairs in contract order, for the docs' settings table and its test."""
    return [(f.metadata["var"], f.metadata["default"]) for f in fields(Settings)]
