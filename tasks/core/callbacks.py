"""Completion callbacks without Celery: the body, its signature, the allowlist and one POST.

The signature follows the scheme payment and code-hosting platforms use: the header
`Downloads-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">` with the shared
secret, so a receiver checks the body is ours and fresh (it rejects an old `t`: a replay)."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import requests

from download_client.errors import PermanentError, TransientError
from download_client.redact import redact_url
from tasks.core import failures
from tasks.core.egress import bypasses

SIGNATURE_HEADER = "Downloads-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"


def body(task_id: str, state: str, result: Any) -> str:
    """The JSON a receiver gets: the task id and state, the result on SUCCESS, the error's
    message on FAILURE (both as the result backend holds them: redacted)."""
    doc: dict[str, Any] = {"task_id": task_id, "state": state}
    if state == "SUCCESS":
        doc["result"] = result
    elif result is not None:
        doc["error"] = str(result)[:2000]
    return json.dumps(doc, sort_keys=True, separators=(",", ":"))


def signature(secret: str, text: str, now: float | None = None) -> str:
    stamp = int(time.time() if now is None else now)
    mac = hmac.new(secret.encode(), f"{stamp}.{text}".encode(), hashlib.sha256).hexdigest()
    return f"t={stamp},v1={mac}"


def check_allowed(url: str, allow: tuple[str, ...]) -> None:
    """A callback goes only to a host on DOWNLOAD_CALLBACK_ALLOW, by name or by every address
    the name resolves to; anything else is refused before a connection is made."""
    host = (urlsplit(url).hostname or "").lower()
    if allow and bypasses(host, allow):
        return
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)} if allow else set()
    except socket.gaierror:
        addresses = set()
    if addresses and all(bypasses(str(a).split("%")[0], allow) for a in addresses):
        return
    raise PermanentError(
        f"callback_url: {host!r} is not on DOWNLOAD_CALLBACK_ALLOW "
        f"({', '.join(allow) if allow else 'empty: no callbacks allowed'})"
    )


def post(
    session: requests.Session, url: str, text: str, secret: str, task_id: str, timeout: float
) -> int:
    """POST the body; a 2xx returns its status, anything else raises TransientError."""
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: signature(secret, text),
        IDEMPOTENCY_HEADER: task_id,
    }
    try:
        response = session.post(
            url, data=text.encode(), headers=headers, timeout=timeout, allow_redirects=False
        )
    except Exception as exc:
        mapped = failures.on_request(exc, url)
        if mapped is None:
            raise
        raise TransientError(str(mapped)) from None
    response.close()
    if not 200 <= response.status_code < 300:
        raise TransientError(f"{redact_url(url)} answered HTTP {response.status_code}")
    return response.status_code
