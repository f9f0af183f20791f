"""The one place where what requests, urllib3 and http.client raise becomes a DownloadError:
PermanentError when the same request would fail the same way, TransientError when it may work
later. Messages never carry the URL's path or query (tokens live there)."""

from __future__ import annotations

import http.client
import re
import ssl
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from download_client.errors import DownloadError, PermanentError, TransientError
from download_client.redact import redact_url

# Errors of the network and of a body cut short; the download may work when tried again.
NETWORK_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)
_REFUSED_REQUESTS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.InvalidSchema,
    requests.exceptions.MissingSchema,
)


def on_request(exc: Exception, url: str) -> DownloadError | None:
    """What a failure to get a response head means; None for an error that is not ours to map."""
    if isinstance(exc, requests.exceptions.InvalidHeader):
        conflict = _length_conflict(exc)
        if conflict is not None:
            return PermanentError(f"the server's response is malformed: {conflict}")
        return PermanentError(f"request refused: {describe(exc)}")
    if isinstance(exc, _REFUSED_REQUESTS):
        return PermanentError(f"request refused: {describe(exc)}")
    if isinstance(exc, NETWORK_ERRORS):
        malformed = _malformed_head(exc)
        if malformed is not None:
            return PermanentError(f"the server's response is malformed: {malformed}")
        tls = _tls_refusal(exc)
        if tls is not None:
            return PermanentError(f"TLS: {tls} ({origin_of(url)})")
        return TransientError(f"cannot reach {redact_url(url)}: {describe(exc)}")
    return None


# TLS alerts a server sends when it will not take our client certificate (or our lack of one):
# the same handshake fails the same way until the settings change.
_CERT_ALERTS = {
    "CERTIFICATE_REQUIRED": "the server requires a client certificate (DOWNLOAD_CLIENT_CERT)",
    "BAD_CERTIFICATE": "the server refused the client certificate",
    "UNKNOWN_CA": "the server does not trust the client certificate's issuer",
    "CERTIFICATE_UNKNOWN": "the server refused the client certificate",
}


def _tls_refusal(exc: BaseException) -> str | None:
    """A certificate problem, worded like curl's; None for TLS failures a retry may mend (a
    reset, a timeout during the handshake)."""
    for seen in _chain(exc):
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"certificate problem: {seen.verify_message or seen.reason}"
        if isinstance(seen, ssl.SSLError):
            for alert, meaning in _CERT_ALERTS.items():
                if alert in str(seen.reason or "") or alert in str(seen):
                    return meaning
    return None


def origin_of(url: str) -> str:
    """scheme://host:port, the part of a URL that names who answered (never a path or query)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else parts.hostname
    return f"{scheme}://{host}:{port}"


def on_body(exc: Exception) -> DownloadError | None:
    """What a failure while reading the body means; None for an error that is not ours to map."""
    if isinstance(exc, NETWORK_ERRORS):
        return TransientError(f"connection failed during the body: {describe(exc)}")
    return None


def invalid_length(value: str) -> str:
    return f"invalid Content-Length {value[:40]!r}"


def _length_conflict(exc: requests.exceptions.InvalidHeader) -> str | None:
    """urllib3 refuses two different Content-Length values itself, before we see the headers
    ("Content-Length contained multiple unmatching values (10, 5)"), and requests reports it as
    an InvalidHeader, the error it also uses for a bad header of ours: tell the two apart."""
    cause = exc.__context__
    if not isinstance(cause, urllib3.exceptions.InvalidHeader):
        return None
    values = re.search(r"\((.*)\)$", str(cause))
    return invalid_length(values.group(1)) if values else str(cause)


def _malformed_head(exc: BaseException) -> http.client.HTTPException | None:
    """http.client's refusal of a response head past its limits (over 100 header lines, a line
    over 64 KiB): the server answers the same way every time, so a retry cannot help."""
    for seen in _chain(exc):
        if isinstance(seen, http.client.LineTooLong) or type(seen) is http.client.HTTPException:
            return seen
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """The exceptions inside `exc`: causes, contexts, urllib3's `reason` and exceptions carried
    as arguments (ProtocolError('Connection aborted.', <it>) inside MaxRetryError.reason)."""
    found: list[BaseException] = []
    todo: list[object] = [exc]
    while todo and len(found) < 16:  # a chain can loop
        seen = todo.pop()
        if isinstance(seen, BaseException) and seen not in found:
            found.append(seen)
            todo += [seen.__cause__, seen.__context__, getattr(seen, "reason", None), *seen.args]
    return found


def describe(exc: BaseException) -> str:
    """A short cause without the URL (which may hold a token) that requests puts in messages."""
    while exc.__context__ is not None and isinstance(exc, requests.RequestException):
        exc = exc.__context__
    name = type(exc).__name__
    text = str(exc)
    text = re.sub(r"https?://\S+", "<url>", text)
    text = re.sub(r"with url: \S+", "with url: <url>", text)  # urllib3's path and query
    text = re.sub(r"(url|host)='?[^,)']*'?", r"\1=<redacted>", text)
    return f"{name}: {text}"[:300]
