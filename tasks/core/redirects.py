"""A GET with redirects followed here rather than by requests, so that each hop's URL is checked
like the first and the caller's headers go only to the origin they were given for (aria2#1176)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from urllib.parse import urljoin, urlsplit

import requests

from download_client.arguments import check_url
from download_client.errors import PermanentError
from tasks.core import failures
from tasks.core.http import EgressSession
from tasks.core.responses import content_length

MAX_REDIRECTS = 10
_OURS = ("Range", "If-Range")


@contextlib.contextmanager
def opened(
    session: requests.Session,
    url: str,
    headers: dict[str, str],
    timeout: tuple[float, float],
    gate: Callable[[str], None] | None = None,
) -> Iterator[requests.Response]:
    """The final response, its head checked; errors of the body read inside become
    DownloadErrors too. The response is closed (its connection back to the pool) on exit.
    `gate` sees each hop's URL before its request: the origin slot is the hop's."""
    origin = _origin(url)
    caller = {k: v for k, v in headers.items() if k not in _OURS}
    ours = {k: v for k, v in headers.items() if k in _OURS}
    for _ in range(MAX_REDIRECTS + 1):
        hop_headers = {**caller, **ours} if _origin(url) == origin else ours
        if gate is not None:
            gate(url)
        response = _send(session, url, hop_headers, timeout)
        if not response.is_redirect:
            # The URL as asked for (the submitted text, or the Location joined to it), not the
            # one requests re-encoded to send (non-ASCII percent-encoded, the host in IDNA).
            response.url = url
            try:
                yield response
            except Exception as exc:
                mapped = failures.on_body(exc, url, _received(response), timeout)
                if mapped is None:
                    raise
                raise mapped from None
            finally:
                response.close()
            return
        location = response.headers["Location"]
        response.close()
        try:
            url = check_url(urljoin(url, location))
        except PermanentError as exc:
            raise PermanentError(f"redirect refused: {exc}") from None
    raise PermanentError(f"more than {MAX_REDIRECTS} redirects")


def _send(
    session: requests.Session, url: str, headers: dict[str, str], timeout: tuple[float, float]
) -> requests.Response:
    try:
        if isinstance(session, EgressSession):
            response = session.stream_get(url, headers, timeout)
        else:
            response = session.get(
                url, headers=headers, stream=True, allow_redirects=False, timeout=timeout
            )
    except Exception as exc:
        mapped = failures.on_request(exc, url, timeout)
        if mapped is None:
            raise
        raise mapped from None
    try:
        content_length(response)  # a malformed length is refused before anything else
    except PermanentError:
        response.close()
        raise
    return response


def _received(response: requests.Response) -> int | None:
    """Bytes of this response's body read so far (urllib3 counts them as they arrive)."""
    try:
        return int(response.raw.tell())
    except (AttributeError, TypeError, ValueError, OSError):
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or ""), parts.port or (443 if scheme == "https" else 80)
