"""One typed settings object, read from the environment. Every default is documented here and in
the README's settings table; the Celery configuration is derived from it in `worker.celery_app`."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

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


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(raw: str) -> T:
        value = kind(raw)
        if value <= 0:  # type: ignore[operator]
            raise ValueError("must be greater than 0")
        return value

    return parse


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must be 0 or more")
    return value


# (environment variable, parser, default). Order and names are the public contract.
_SOURCES: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "broker_url": ("CELERY_BROKER_URL", str, "redis://localhost:6379/0"),
    "result_backend": ("CELERY_RESULT_BACKEND", str, "redis://localhost:6379/1"),
    "download_dir": ("DOWNLOAD_DIR", Path, "./downloads"),
    "allow_private": ("DOWNLOAD_ALLOW_PRIVATE", _bool, "false"),
    "connect_timeout": ("DOWNLOAD_CONNECT_TIMEOUT", _positive(float), "10"),
    "read_timeout": ("DOWNLOAD_READ_TIMEOUT", _positive(float), "30"),
    "max_retries": ("DOWNLOAD_MAX_RETRIES", _non_negative_int, "5"),
    "retry_backoff": ("DOWNLOAD_RETRY_BACKOFF", _positive(float), "2"),
    "retry_backoff_max": ("DOWNLOAD_RETRY_BACKOFF_MAX", _positive(float), "600"),
    "max_bytes": ("DOWNLOAD_MAX_BYTES", _positive(int), str(10 * 1024**3)),
    "chunk_size": ("DOWNLOAD_CHUNK_SIZE", _positive(int), str(128 * 1024)),
    "progress_interval": ("DOWNLOAD_PROGRESS_INTERVAL", _positive(float), "0.5"),
    "soft_time_limit": ("DOWNLOAD_SOFT_TIME_LIMIT", _positive(float), "3000"),
    "time_limit": ("DOWNLOAD_TIME_LIMIT", _positive(float), "3300"),
    "visibility_timeout": ("DOWNLOAD_VISIBILITY_TIMEOUT", _positive(int), "7200"),
    "max_deliveries": ("DOWNLOAD_MAX_DELIVERIES", _positive(int), "3"),
    "partial_max_age": ("DOWNLOAD_PARTIAL_MAX_AGE", _positive(int), str(7 * 24 * 3600)),
    "partial_sweep_interval": ("DOWNLOAD_PARTIAL_SWEEP_INTERVAL", _positive(float), "3600"),
    "result_expires": ("DOWNLOAD_RESULT_EXPIRES", _positive(int), str(7 * 24 * 3600)),
    "result_outage": ("DOWNLOAD_RESULT_OUTAGE", _positive(float), "300"),
    "shutdown_grace": ("DOWNLOAD_SHUTDOWN_GRACE", _positive(float), "90"),
    "max_tasks_per_child": ("WORKER_MAX_TASKS_PER_CHILD", _non_negative_int, "1000"),
    "max_memory_per_child": ("WORKER_MAX_MEMORY_PER_CHILD", _non_negative_int, "262144"),
}


@dataclass(frozen=True)
class Settings:
    broker_url: str
    result_backend: str
    download_dir: Path
    allow_private: bool
    connect_timeout: float
    read_timeout: float
    max_retries: int
    retry_backoff: float
    retry_backoff_max: float
    max_bytes: int
    chunk_size: int
    progress_interval: float
    soft_time_limit: float
    time_limit: float
    visibility_timeout: int
    max_deliveries: int
    partial_max_age: int
    partial_sweep_interval: float
    result_expires: int
    result_outage: float
    shutdown_grace: float
    max_tasks_per_child: int
    max_memory_per_child: int

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for name, (var, parse, default) in _SOURCES.items():
            raw = env.get(var, default)
            try:
                values[name] = parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{var}={raw!r}: {exc}") from None
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        if self.soft_time_limit >= self.time_limit:
            raise SettingsError("DOWNLOAD_SOFT_TIME_LIMIT must be below DOWNLOAD_TIME_LIMIT")
        # Redis redelivers an unacked message once the visibility timeout passes, counted from
        # delivery: a running task or a retry waiting its countdown would run twice (celery#5935).
        if self.visibility_timeout <= self.time_limit + self.retry_backoff_max:
            raise SettingsError(
                "DOWNLOAD_VISIBILITY_TIMEOUT must exceed DOWNLOAD_TIME_LIMIT + "
                "DOWNLOAD_RETRY_BACKOFF_MAX, or Redis hands running downloads to a second worker"
            )

    @property
    def broker_is_rabbitmq(self) -> bool:
        return self.broker_url.partition("://")[0] in ("amqp", "amqps", "pyamqp")

    @property
    def partial_dir(self) -> Path:
        return self.download_dir / ".partial"


def documented() -> list[tuple[str, str]]:
    """(variable, default) pairs in contract order, for the README table and its test."""
    return [(var, default) for var, _, default in _SOURCES.values()]


assert [f.name for f in fields(Settings)] == list(_SOURCES), "Settings and _SOURCES disagree"
