"""Keeping secrets out of logs, events, Flower and results: URL passwords, the values of query
parameters named in SECRET_PARAMS (plus DOWNLOAD_REDACT_PARAMS) and every caller-supplied header
value. Everything else of a URL is kept as submitted, character for character."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote_plus, urlsplit

MASK = "***"

# Exact names, compared case-insensitively after percent-decoding. A list of names rather than a
# pattern: a pattern that catches every `*token*` also masks `author`, `keyword`, `design`. Left
# out on purpose: `code` (an HTTP status, a product code far more often than an OAuth code, which
# is single-use and short-lived anyway), Azure SAS's `se`/`sp`/`sv` (expiry, permissions and
# version: not secrets; its `sig` is), `Expires`, `Key-Pair-Id`, `Policy` (public parts of a
# CloudFront URL whose secret is `Signature`).
SECRET_PARAMS = frozenset(
    name.lower()
    for name in (
        # bearer and OAuth tokens
        "token",
        "access_token",
        "refresh_token",
        "id_token",
        "auth_token",
        "private_token",
        "oauth_token",
        "oauth_signature",
        "jwt",
        # API keys (Google's APIs take theirs as `key`)
        "key",
        "api_key",
        "apikey",
        "api-key",
        "access_key",
        "secret_key",
        # passwords and shared secrets
        "password",
        "passwd",
        "pwd",
        "pass",
        "secret",
        "client_secret",
        "auth",
        "authorization",
        "credential",
        "credentials",
        # session identifiers
        "session",
        "sessionid",
        "session_id",
        "sid",
        # signatures: generic, Azure SAS, CloudFront and GCS v2
        "signature",
        "sig",
        # AWS S3 presigned URLs (v4 and v2)
        "X-Amz-Signature",
        "X-Amz-Credential",
        "X-Amz-Security-Token",
        "AWSAccessKeyId",
        # Google Cloud Storage signed URLs (v4 and v2)
        "X-Goog-Signature",
        "X-Goog-Credential",
        "GoogleAccessId",
    )
)
_extra: set[str] = set()


def add_secret_params(names: Iterable[str]) -> None:
    """Mask these parameter names too, in this process (DOWNLOAD_REDACT_PARAMS; the app and the
    client call this with the settings they are made from)."""
    _extra.update(n.lower() for n in names)


def is_secret_param(name: str) -> bool:
    decoded = unquote_plus(name).lower()
    return decoded in SECRET_PARAMS or decoded in _extra


def redact_url(url: str) -> str:
    """The URL with its password and secret parameters' values replaced by ***; every other
    character is the submitted one (no re-encoding, fragment and an empty `?` kept)."""
    try:
        urlsplit(url)  # what cannot be parsed is not shown at all
    except ValueError:
        return "<unparseable url>"
    rest, hash_, fragment = url.partition("#")
    rest, question, query = rest.partition("?")
    scheme, sep, after = rest.partition("//")
    if sep:
        netloc, slash, path = after.partition("/")
        rest = f"{scheme}{sep}{_redact_netloc(netloc)}{slash}{path}"
    # A fragment is never sent, but OAuth's implicit flow puts tokens there (#access_token=...).
    return f"{rest}{question}{_redact_query(query)}{hash_}{_redact_query(fragment)}"


def _redact_netloc(netloc: str) -> str:
    if "@" not in netloc:
        return netloc
    userinfo, _, hostport = netloc.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{user}:{MASK}@{hostport}" if colon else f"{MASK}@{hostport}"


def _redact_query(query: str) -> str:
    """Each `name=value` of a query string, its value masked if the name is a secret one;
    everything else is kept byte for byte."""
    if not query:
        return query
    return "&".join(_redact_param(p) for p in query.split("&"))


def _redact_param(param: str) -> str:
    name, eq, _ = param.partition("=")
    return f"{name}={MASK}" if eq and is_secret_param(name) else param


# The order shown kwargs are in (a dict's repr follows it): the URL first, so a narrow cell
# (Flower's task list) starts with it; the headers, the longest, last.
SHOWN_ORDER = ("url", "dest", "sha256", "max_bytes", "callback_url")


def redact_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The task's kwargs as they may be shown: header values masked, the URL redacted; the URL
    first, then the destination, the other arguments, the headers last."""
    first = {k: kwargs[k] for k in SHOWN_ORDER if k in kwargs}
    shown = {**first, **{k: v for k, v in kwargs.items() if k not in first and k != "headers"}}
    if "headers" in kwargs:
        shown["headers"] = kwargs["headers"]
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
