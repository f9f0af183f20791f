"""The one place where what requests, urllib3 and http.client raise becomes a DownloadError:
PermanentError when the same request would fail the same way, TransientError when it may work
later. Messages are short and worded like curl's ("connection refused by 127.0.0.1:8080",
"could not resolve host files.example"): the root cause is found in the exception chain and
named with the host and port only, never the URL's path or query (tokens live there) nor a
proxy's credentials."""

from __future__ import annotations

import http.client
import re
import socket
import ssl
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from download_client.errors import DownloadError, PermanentError, TransientError

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
_PROXY_ERRORS = (requests.exceptions.ProxyError, urllib3.exceptions.ProxyError)
_CONNECT_TIMEOUTS = (requests.exceptions.ConnectTimeout, urllib3.exceptions.ConnectTimeoutError)
_TIMEOUTS = (
    TimeoutError,
    requests.Timeout,
    urllib3.exceptions.ConnectTimeoutError,
    urllib3.exceptions.ReadTimeoutError,
)
# Seconds to wait: connect and read, or one for both (what requests' `timeout` takes).
Timeout = float | tuple[float, float] | None


def on_request(exc: Exception, url: str, timeout: Timeout = None) -> DownloadError | None:
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
        cause = root_cause(exc, url, timeout)
        return TransientError(cause or f"cannot reach {_at(_chain(exc), url)}: {describe(exc)}")
    return None


def on_body(
    exc: Exception, url: str = "", received: int | None = None, timeout: Timeout = None
) -> DownloadError | None:
    """What a failure while reading the body means (`received`: the body's bytes this response
    brought before it); None for an error that is not ours to map."""
    if not isinstance(exc, NETWORK_ERRORS):
        return None
    cause = root_cause(exc, url, timeout, received)
    if cause is None:
        after = f" after {size(received)}" if received else ""
        cause = f"transfer from {_at(_chain(exc), url)} failed{after}: {describe(exc)}"
    return TransientError(cause)


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


def root_cause(
    exc: BaseException, url: str, timeout: Timeout = None, received: int | None = None
) -> str | None:
    """The cause of a network failure in a few words, or None when it is not one we know."""
    chain = _chain(exc)
    at = _at(chain, url)
    after = f" after {size(received)}" if received else ""
    if _find(chain, (socket.gaierror, urllib3.exceptions.NameResolutionError)) is not None:
        proxied = _find(chain, _PROXY_ERRORS) is not None
        return f"could not resolve host {at if proxied else urlsplit(url).hostname or at}"
    if _find(chain, (ConnectionRefusedError,)) is not None:
        return f"connection refused by {at}"
    # urllib3's NewConnectionError is a ConnectTimeoutError too, for any failed connect.
    timeouts = [e for e in chain if isinstance(e, _TIMEOUTS)]
    if any(isinstance(e, urllib3.exceptions.NewConnectionError) for e in timeouts):
        timeouts = []
    if any(isinstance(e, _CONNECT_TIMEOUTS) for e in timeouts):
        return f"timed out{_after(timeout, 0)} connecting to {at}"
    if timeouts:
        got = f" with {size(received)} received" if received else ""
        return f"timed out{_after(timeout, 1)} waiting for {at}{got}"
    short = _find(chain, (urllib3.exceptions.IncompleteRead, http.client.IncompleteRead))
    if short is not None:
        return f"connection closed by {at}{_short_by(short, received)}"
    if _find(chain, (http.client.RemoteDisconnected,)) is not None:
        return f"empty reply from {at}"  # closed before a response head: curl's words
    if _find(chain, (ConnectionResetError,)) is not None:
        return f"connection reset by {at}{after}"
    tls = _find(chain, (ssl.SSLError,))
    if isinstance(tls, ssl.SSLError):
        return f"TLS error with {at}: {tls.reason or tls.strerror or 'handshake failed'}{after}"
    system = next((e for e in chain if isinstance(e, OSError) and e.strerror), None)
    if isinstance(system, OSError):  # no route to host, network unreachable...
        return f"cannot connect to {at}: {str(system.strerror).lower()}{after}"
    return None


def gave_up(message: str, attempts: int, seconds: float) -> str:
    """The final word on a download whose retries ran out: its last cause and what was tried."""
    if attempts == 1:
        return f"{message}, 1 attempt"
    return f"{message}, {attempts} attempts over {duration(seconds)}"


def gave_up_at_deadline(message: str, attempts: int, seconds: float) -> str:
    """The final word on a download whose deadline came: its last cause and what was tried."""
    tried = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return f"{message}, gave up at the deadline after {tried} over {duration(seconds)}"


def where(url: str) -> str:
    """host:port of a URL, the part that names who answered (never a path, a query or a user)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        port = None
    host = parts.hostname or "?"
    host = f"[{host}]" if ":" in host else host
    return host if port is None else f"{host}:{port}"


def origin_of(url: str) -> str:
    """scheme://host:port, the part of a URL that names who answered (never a path or query)."""
    return f"{urlsplit(url).scheme.lower()}://{where(url)}"


def size(n: int) -> str:
    """Bytes as people read them: 512 B, 1.2 MiB."""
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _after(timeout: Timeout, which: int) -> str:
    """ " after 30 s": the connect (0) or read (1) timeout that ran out, when it is known."""
    if isinstance(timeout, tuple):
        return f" after {timeout[which]:g} s"
    return "" if timeout is None else f" after {timeout:g} s"


def _short_by(short: BaseException, received: int | None) -> str:
    """How much of the body came, and how much was promised: urllib3's IncompleteRead counts
    both as ints, http.client's holds the bytes read."""
    partial, expected = getattr(short, "partial", None), getattr(short, "expected", None)
    got = partial if isinstance(partial, int) else received
    if isinstance(got, int) and isinstance(expected, int):
        return f" after {size(got)} of {size(got + expected)}"
    return f" after {size(got)}" if got else ""


def _at(chain: list[BaseException], url: str) -> str:
    """Who failed: the URL's host:port, or the proxy's when the proxy did (never the proxy's
    URL, which may carry credentials), from the connection urllib3 failed to make."""
    if _find(chain, _PROXY_ERRORS) is None:
        return where(url)
    for seen in chain:
        conn = getattr(seen, "conn", None)
        host, port = getattr(conn, "host", None), getattr(conn, "port", None)
        if isinstance(host, str) and host:
            host = f"[{host}]" if ":" in host else host
            return f"the proxy {host}:{port}" if port else f"the proxy {host}"
    return "the proxy"


def _find(chain: list[BaseException], types: tuple[type, ...]) -> BaseException | None:
    return next((e for e in chain if isinstance(e, types)), None)


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
