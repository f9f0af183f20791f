"""Other URLs of the same bytes (the `mirrors` argument): the first response from the URL or,
where that fails before its body, from each mirror in turn; the sources a segmented download
takes its ranges from; and which headers each may see. A mirror is opened as the URL is (the
same session's address checks, redirect rules and gate), and is trusted for its bytes only
through the sha256 a request with mirrors must give."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager

import requests

from download_client.arguments import DownloadRequest
from download_client.errors import DownloadError
from download_client.redact import redact_url
from tasks.core import origins
from tasks.core.segments import Source
from tasks.core.storage import Ranges

log = logging.getLogger(__name__)


# Opens a URL with headers: the response, its redirects followed (redirects.opened).
Opener = Callable[[str, dict[str, str]], AbstractContextManager[requests.Response]]


@contextlib.contextmanager
def first_response(
    request: DownloadRequest, headers: dict[str, str], open_url: Opener
) -> Iterator[tuple[requests.Response, str]]:
    """The response to the download's first request, and the URL asked: the download's, or,
    where that fails before its body (an error, a status of 400 or more), each mirror in
    turn."""
    urls = [request.url, *request.mirrors]
    for i, url in enumerate(urls):
        last = i + 1 == len(urls)
        stack = contextlib.ExitStack()
        try:
            response = stack.enter_context(open_url(url, headers_for(request, url, headers)))
        except DownloadError as exc:
            if last:
                raise
            log.info("%s failed (%s); trying the next mirror", redact_url(url), exc)
            continue
        if not last and response.status_code >= 400:
            stack.close()
            log.info("%s answered %s; trying the next mirror", redact_url(url),
                     response.status_code)  # fmt: skip
            continue
        with stack:
            yield response, url
        return


def headers_for(request: DownloadRequest, url: str, ours: dict[str, str]) -> dict[str, str]:
    """What `url` may see of `ours`: all of it at the download's URL; elsewhere the caller's
    headers only at the URL's origin (as on a redirect), and never If-Range (its validator is
    the URL's)."""
    if url == request.url:
        return ours
    same = origins.origin_of(url) == origins.origin_of(request.url)
    return {k: v for k, v in ours.items()
            if k != "If-Range" and (same or k not in request.headers)}  # fmt: skip


def sources(request: DownloadRequest, ranges: Ranges) -> list[Source]:
    """The main source (where the validator came from: asked with If-Range), then the mirrors;
    those at the origin of the run's own slot need no other for its first connection."""
    own = origins.origin_of(ranges.url)
    ours = dict(request.headers)
    main = Source(ranges.url, headers_for(request, ranges.url, ours), ranges.validator, True)
    others = [m for m in request.mirrors if m != ranges.url]
    return [main, *(Source(m, headers_for(request, m, ours), None, origins.origin_of(m) == own)
                    for m in others)]  # fmt: skip
