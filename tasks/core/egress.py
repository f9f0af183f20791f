"""How downloads leave this host: the TLS trust (a private CA in addition to the default set or
instead of it, a client certificate) and the egress proxy with its exceptions. The session
ignores the environment on purpose (REQUESTS_CA_BUNDLE, HTTPS_PROXY...): these settings are the
only way in, and a proxied target is still checked before any request."""

from __future__ import annotations

import functools
import ipaddress
import os
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import certifi


class EgressError(ValueError):
    """A TLS or proxy setting the worker cannot use (a missing file, a key that does not fit)."""


@dataclass(frozen=True)
class Egress:
    ca_bundle: str = ""
    ca_only: bool = False
    client_cert: str = ""
    client_key: str = ""
    proxy: str = ""
    no_proxy: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, s: Any) -> Egress:
        return cls(s.ca_bundle, s.ca_only, s.client_cert, s.client_key, s.proxy, s.no_proxy)

    def ssl_context(self) -> ssl.SSLContext:
        """requests' default trust (certifi), plus or instead of DOWNLOAD_CA_BUNDLE: one context
        a process for these settings, made once. The worker makes it before the pool forks, so
        children share its 1.6 MiB of parsed certificates instead of each parsing its own (a
        context holds trust and options, never a connection, so sharing it is safe)."""
        return _context(self)

    def _new_context(self) -> ssl.SSLContext:
        if self.ca_only:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifying, names checked, no trust yet
        else:
            ctx = ssl.create_default_context(cafile=certifi.where())
        try:
            if self.ca_bundle and os.path.isdir(self.ca_bundle):
                ctx.load_verify_locations(capath=self.ca_bundle)
            elif self.ca_bundle:
                ctx.load_verify_locations(cafile=self.ca_bundle)
        except (OSError, ssl.SSLError) as exc:
            raise EgressError(f"DOWNLOAD_CA_BUNDLE={self.ca_bundle!r}: {exc}") from None
        try:
            if self.client_cert:
                ctx.load_cert_chain(self.client_cert, self.client_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise EgressError(
                f"DOWNLOAD_CLIENT_CERT={self.client_cert!r} / DOWNLOAD_CLIENT_KEY: {exc}"
            ) from None
        return ctx

    def proxy_for(self, url: str) -> str | None:
        """The proxy a request to `url` goes through, or None (no proxy, or an exception)."""
        if not self.proxy:
            return None
        host = (urlsplit(url).hostname or "").lower()
        return None if bypasses(host, self.no_proxy) else self.proxy


def bypasses(host: str, no_proxy: tuple[str, ...]) -> bool:
    """curl's NO_PROXY rules: `*` for every host, a name matches itself and its subdomains
    (a leading dot is optional), an address or CIDR range matches the addresses in it."""
    for entry in no_proxy:
        if entry == "*":
            return True
        if "/" in entry or _is_ip(entry):
            if _is_ip(host) and _in_range(host, entry):
                return True
            continue
        name = entry.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _in_range(host: str, entry: str) -> bool:
    try:
        return ipaddress.ip_address(host) in ipaddress.ip_network(entry, strict=False)
    except ValueError:
        return False


@functools.cache
def _context(egress: Egress) -> ssl.SSLContext:
    return egress._new_context()
