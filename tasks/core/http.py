"""Building the per-process `requests.Session`: pool sizes, no hidden retries or proxies, identity
encoding, and an address check made at connect time, on the address actually dialled."""

from __future__ import annotations

import http.cookiejar
import ipaddress
import socket
import ssl
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError, NewConnectionError
from urllib3.util.retry import Retry

from download_client.errors import BlockedAddressError
from tasks.core.egress import Egress

USER_AGENT = "download-workers/0.1 (+requests)"


def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """True for a globally routable unicast address; false for loopback, private, link-local,
    multicast, reserved, unspecified and shared (CGNAT) space, also behind an IPv4-mapped IPv6."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return address_allowed(mapped)
        if ip.teredo is not None:
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def resolve_checked(host: str, port: int, allow_private: bool) -> list[tuple[int, str]]:
    """Resolve `host` and return (family, address) pairs to dial. Refuses the whole host if any
    address is not allowed, so a name cannot mix a public and an internal address."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    pairs: list[tuple[int, str]] = []
    for family, _, _, _, sockaddr in infos:
        address = str(sockaddr[0])
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if not allow_private and not address_allowed(ip):
            raise BlockedAddressError(
                f"refused to connect to {host!r}: it resolves to {ip}, which is not a public "
                "address (the workers' DOWNLOAD_ALLOW_PRIVATE setting allows it)"
            )
        if (family, address) not in pairs:
            pairs.append((family, address))
    return pairs


class _CheckedConnectionMixin:
    """Resolves once, checks every address, then dials only the checked addresses: a second DNS
    answer (rebinding) can never reach the socket.

    urllib3 has no public hook between resolving and dialling, so this is one of the worker's
    three doors to upstream internals (worker/celery_internals.py says which). urllib3/connection.py
    (read in 2.8.0): `HTTPConnection._new_conn` opens the socket with
    `connection.create_connection((self._dns_host, self.port), ...)`, and `_dns_host` is the host
    it resolves (the `host` property's store, trailing dot kept). Each has a canary in
    tests/test_upstream_canaries.py."""

    allow_private = False
    _dns_host: str
    host: str
    port: int

    def _new_conn(self) -> socket.socket:
        try:
            pairs = resolve_checked(self._dns_host, self.port, self.allow_private)
        except socket.gaierror as exc:
            # urllib3's error, raised here: letting urllib3 resolve again would dial an answer
            # nothing checked (a failed lookup followed by an internal one).
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[arg-type]
        name = self._dns_host
        last: Exception | None = None
        try:
            for _, address in pairs:
                self._dns_host = address
                try:
                    return super()._new_conn()  # type: ignore[misc, no-any-return]
                except NewConnectionError as exc:
                    last = exc
        finally:
            self._dns_host = name
        assert last is not None
        raise last


class CheckedHTTPConnection(_CheckedConnectionMixin, HTTPConnection):
    pass


class CheckedHTTPSConnection(_CheckedConnectionMixin, HTTPSConnection):
    pass


class CheckedAdapter(HTTPAdapter):
    """An HTTPAdapter whose pools dial through the address check and verify TLS with the
    egress settings' trust, directly or through the proxy's tunnel."""

    def __init__(self, allow_private: bool, ssl_context: ssl.SSLContext, **kwargs: Any) -> None:
        self._allow_private = allow_private
        self._ssl_context = ssl_context
        super().__init__(**kwargs)

    def proxy_manager_for(self, proxy: str, **kwargs: Any) -> Any:
        # requests builds the proxy's pool manager without the direct one's TLS context.
        kwargs.setdefault("ssl_context", self._ssl_context)
        return super().proxy_manager_for(proxy, **kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("ssl_context", self._ssl_context)
        super().init_poolmanager(*args, **kwargs)
        allow = self._allow_private
        http_conn = type("Conn", (CheckedHTTPConnection,), {"allow_private": allow})
        https_conn = type("Conn", (CheckedHTTPSConnection,), {"allow_private": allow})
        http = type("Pool", (HTTPConnectionPool,), {"ConnectionCls": http_conn})
        https = type("Pool", (HTTPSConnectionPool,), {"ConnectionCls": https_conn})
        self.poolmanager.pool_classes_by_scheme = {"http": http, "https": https}


class EgressSession(requests.Session):
    """A session that picks the proxy per request (DOWNLOAD_NO_PROXY) and, when a request goes
    through the proxy, checks the target's addresses itself first: the proxy dials the target,
    so the connect-time check never sees it."""

    def __init__(self, allow_private: bool, egress: Egress) -> None:
        super().__init__()
        self.allow_private, self.egress = allow_private, egress

    def request(self, method: str | bytes, url: str | bytes, *args: Any, **kwargs: Any) -> Any:
        kwargs["proxies"] = self._proxies(str(url))
        return super().request(method, url, *args, **kwargs)

    def stream_get(
        self, url: str, headers: Mapping[str, str], timeout: tuple[float, float]
    ) -> requests.Response:
        """A streamed GET, redirects not followed: what every download hop sends. Prepared with
        requests' own `Request.prepare()` and sent with `Session.send`, on this session's pool and
        adapters, without `Session.request`'s per-call merging, which costs about as much CPU as
        the rest of the request: there is nothing to merge. The environment is never read
        (trust_env is off), no params or auth are set on the session (credentials in the URL are
        still sent, as `prepare` does), and its cookie jar stays empty (the policy refuses every
        cookie), so the session's headers and hooks are all it adds."""
        merged = CaseInsensitiveDict(self.headers)
        merged.update(headers)
        prepared = requests.Request("GET", url, headers=merged, hooks=self.hooks).prepare()
        return self.send(
            prepared,
            stream=True,
            allow_redirects=False,
            timeout=timeout,
            proxies=self._proxies(url),
            verify=self.verify,
            cert=self.cert,
        )

    def _proxies(self, url: str) -> dict[str, str]:
        proxy = self.egress.proxy_for(url)
        if proxy is None:
            return {}
        _check_target(url, self.allow_private)
        return {"http": proxy, "https": proxy}


def _check_target(url: str, allow_private: bool) -> None:
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)
    try:
        resolve_checked(host, port, allow_private)
    except socket.gaierror as exc:
        raise requests.ConnectionError(f"cannot resolve {host!r}: {exc}") from None


def new_session(
    allow_private: bool, pool_maxsize: int = 4, egress: Egress | None = None
) -> requests.Session:
    """The one session a worker process (or thread) uses for all its downloads."""
    egress = egress or Egress()
    session = EgressSession(allow_private, egress)
    # Proxies, CA bundles and .netrc from the environment would route around the address check
    # and the egress settings.
    session.trust_env = False
    # One session serves every caller's tasks in this process: a cookie a server set during one
    # download must never go out with another caller's request. Callers send their own Cookie.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.headers.update({"User-Agent": USER_AGENT, "Accept-Encoding": "identity"})
    # No urllib3 retries: Celery retries and schedules waits instead of a child sleeping for
    # Retry-After; redirects are followed by the download code so each hop is checked.
    retries = Retry(total=0, redirect=False, respect_retry_after_header=False)
    adapter = CheckedAdapter(
        allow_private,
        egress.ssl_context(),
        pool_connections=16,
        pool_maxsize=pool_maxsize,
        max_retries=retries,
    )
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session
