"""Keeping secrets out of logs, events, Flower and results: URL credentials, token-like query
parameters and every caller-supplied header value."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

MASK = "***"
# Query parameter names that carry credentials in signed or tokenised URLs (S3, GCS, Azure SAS...).
_SECRET_PARAM = re.compile(
    r"(token|secret|passw|pwd|auth|sig|signature|credential|key|session|^code$|^sv$|^se$|^sp$)",
    re.IGNORECASE,
)


def redact_url(url: str) -> str:
    """The URL with its password and token-like query values replaced by ***."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:{MASK}@{hostport}" if ":" in userinfo else f"{MASK}@{hostport}"
        query = "&".join(_redact_param(p) for p in parts.query.split("&")) if parts.query else ""
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<unparseable url>"


def _redact_param(param: str) -> str:
    """One `name=value` of a query string, its value masked if the name looks like a secret;
    everything else is kept byte for byte."""
    name, eq, _ = param.partition("=")
    return f"{name}={MASK}" if eq and _SECRET_PARAM.search(unquote(name)) else param


def redact_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task's kwargs as they may be shown: header values masked, the URL redacted."""
    shown = dict(kwargs)
    if isinstance(shown.get("url"), str):
        shown["url"] = redact_url(shown["url"])
    headers = shown.get("headers")
    if isinstance(headers, dict):
        shown["headers"] = {str(k): MASK for k in headers}
    elif headers is not None:
        shown["headers"] = MASK
    return shown


def redact_reprs(args: Any, kwargs: Any) -> tuple[str, str]:
    """argsrepr and kwargsrepr of a downloads.fetch call, as events and Flower may show them."""
    shown_args: Any = MASK
    if isinstance(args, list | tuple):
        shown_args = [redact_url(a) if isinstance(a, str) else MASK for a in args]
    shown_kwargs = redact_kwargs(kwargs) if isinstance(kwargs, dict) else MASK
    return repr(shown_args), repr(shown_kwargs)
