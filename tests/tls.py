"""Real TLS parts for the tests: a certificate authority the test makes, HTTPS origins signed by
it (a valid name, an expired certificate, a wrong name, a self-signed one, one that requires a
client certificate), and tinyproxy from Debian as the egress proxy. Only 127.0.0.1 is used."""

from __future__ import annotations

import re
import shutil
import socket
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.harness import free_port, wait_for
from tests.server import OriginServer

DAY = timedelta(days=1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> Path:
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


class CA:
    """A CA of the test's own; `issue` signs a leaf certificate and writes cert and key."""

    def __init__(self, directory: Path, name: str = "downloads test CA") -> None:
        self.dir = directory
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - DAY)
            .not_valid_after(now + 30 * DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = _write(directory / f"{name.replace(' ', '-')}.pem", self.cert, self.key)

    def issue(
        self, stem: str, names: tuple[str, ...] = ("localhost",), expired: bool = False,
        client: bool = False, self_signed: bool = False,
    ) -> Path:  # fmt: skip
        """A leaf certificate (at `<stem>.pem`, its key at `<stem>.key`)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        start, end = (now - 30 * DAY, now - DAY) if expired else (now - DAY, now + 30 * DAY)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        issuer, signer = (_name(names[0]), key) if self_signed else (self.cert.subject, self.key)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(names[0]))
            .issuer_name(issuer)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if not client:
            sans = [x509.DNSName(n) for n in names]
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        if not self_signed:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key())
            builder = builder.add_extension(aki, critical=False)
        return _write(self.dir / f"{stem}.pem", builder.sign(signer, hashes.SHA256()), key)


class TLSOrigin(OriginServer):
    """The test origin behind TLS, reached as https://localhost:<port>. Counts handshakes that
    failed (a client that refused the certificate never sends a request)."""

    def __init__(self, cert: Path, client_ca: Path | None = None) -> None:
        super().__init__()
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, cert.with_suffix(".key"))
        if client_ca is not None:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(client_ca)
        self.ctx = ctx
        self.failed_handshakes = 0

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            with self.stats.lock:
                self.failed_handshakes += 1
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()  # it took the accepted socket's descriptor over

    @property
    def url(self) -> str:
        return f"https://localhost:{self.server_address[1]}"


TINYPROXY_CONF = """\
Port {port}
Listen 127.0.0.1
Timeout 30
LogFile "{dir}/tinyproxy.log"
LogLevel Connect
PidFile "{dir}/tinyproxy.pid"
MaxClients 100
Allow 127.0.0.1
DisableViaHeader Yes
{auth}
"""


class Tinyproxy:
    """Debian's tinyproxy in the foreground on a free loopback port; `requests()` reads what
    passed through it from its own log."""

    def __init__(self, directory: Path, user: str = "", password: str = "") -> None:
        self.dir, self.port = directory, free_port()
        self.user, self.password = user, password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        cred = f"{self.user}:{self.password}@" if self.user else ""
        return f"http://{cred}127.0.0.1:{self.port}"

    def start(self) -> Tinyproxy:
        binary = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
        auth = f"BasicAuth {self.user} {self.password}" if self.user else ""
        conf = self.dir / "tinyproxy.conf"
        conf.write_text(TINYPROXY_CONF.format(port=self.port, dir=self.dir, auth=auth))
        self.proc = subprocess.Popen(
            [binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self._listening, 10, "tinyproxy to listen")
        return self

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def requests(self) -> list[str]:
        """The request lines the proxy took ("CONNECT localhost:443 HTTP/1.1", "GET http://...")."""
        log = self.dir / "tinyproxy.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return re.findall(r"Request \(file descriptor \d+\): (.*)", text)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
