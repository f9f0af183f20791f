"""Failures named by what the caller can do about them: wait and retry, or fix the request."""

from __future__ import annotations


class DownloadError(Exception):
    """Base of every failure the download code raises on purpose. The message is safe to show:
    it never carries header values or URL credentials."""

    def __repr__(self) -> str:
        # Celery's task-failed and task-retried events carry the exception's repr, which is what
        # Flower shows as the exception: the message alone, as the result shows it.
        return str(self)


class PermanentError(DownloadError):
    """Retrying cannot help: a bad argument, a 4xx, a checksum mismatch, a size cap."""


class TransientError(DownloadError):
    """The same request may work later: a timeout, a dropped connection, 429 or 5xx."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def __reduce__(self) -> tuple[type[TransientError], tuple[str, float | None]]:
        return (type(self), (str(self), self.retry_after))


class BlockedAddressError(PermanentError):
    """The host resolves to an address this worker may not connect to (SSRF protection)."""


class DestinationBusyError(TransientError):
    """Another task is writing the same destination right now."""
