"""HTTPS and the egress proxy against real workers: origins signed by a CA the test makes, and
tinyproxy counting what passes through it. Certificate problems fail at once with their cause;
DOWNLOAD_CA_BUNDLE, DOWNLOAD_CLIENT_CERT, DOWNLOAD_PROXY and DOWNLOAD_NO_PROXY do what
docs/tls-and-proxies.md says; resume, redirects and size caps behave as over plain HTTP."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest

from tests.conftest import failure, run
from tests.harness import free_port, wait_for
from tests.server import body_sha256
from tests.tls import CA, Tinyproxy, TLSOrigin

PROXY_PASSWORD = "pr0xy-s3cret-XYZ"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("pki")
    ca = CA(d)
    return {
        "ca": ca,
        "good": ca.issue("good"),
        "expired": ca.issue("expired", expired=True),
        "wrong": ca.issue("wrong", names=("other.test",)),
        "self": ca.issue("self", self_signed=True),
        "client": ca.issue("client", names=("a-worker",), client=True),
    }


@pytest.fixture(scope="module")
def origins(pki: dict[str, Any]) -> Iterator[dict[str, TLSOrigin]]:
    started = {name: TLSOrigin(pki[name]).start() for name in ("good", "expired", "wrong", "self")}
    started["mtls"] = TLSOrigin(pki["good"], client_ca=pki["ca"].path).start()
    yield started  # type: ignore[misc]
    for o in started.values():
        o.stop()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tinyproxy]:
    p = Tinyproxy(tmp_path_factory.mktemp("proxy"), "downloads", PROXY_PASSWORD).start()
    yield p
    p.stop()


@pytest.fixture(scope="module")
def trusting(start_worker, pki):
    return start_worker(DOWNLOAD_CA_BUNDLE=str(pki["ca"].path))


def _url(origin, key: str, size: int = 5000, query: str = "") -> str:
    return f"{origin.url}/bytes/{size}?seed={key}&key={key}{query}"


@pytest.mark.parametrize(
    ("origin", "cause"),
    [
        ("expired", "certificate has expired"),
        ("wrong", "Hostname mismatch"),
        ("self", "self-signed certificate"),
    ],
)
def test_a_certificate_problem_fails_once_with_its_cause(client, trusting, origins, origin, cause):
    o = origins[origin]
    before = o.failed_handshakes + len(o.stats.requests)
    state, message = failure(client, trusting, url=_url(o, f"bad-{origin}"), dest=f"{origin}.bin")
    assert state == "FAILURE"
    assert cause in message and o.url.replace("https://", "") in message, message
    assert "attempt" not in message  # not retried
    # The origin's thread counts the refused handshake after the client has hung up: wait for it.
    tried = wait_for(lambda: o.failed_handshakes + len(o.stats.requests) - before, 10, "the try")
    assert tried == 1


def test_a_private_ca_is_not_trusted_without_the_setting(client, worker, origins):
    o = origins["good"]
    state, message = failure(client, worker, url=_url(o, "untrusted"), dest="untrusted.bin")
    assert state == "FAILURE" and "unable to get local issuer certificate" in message


def test_the_private_ca_is_trusted_with_the_setting(client, trusting, origins, key):
    got = run(client, trusting, url=_url(origins["good"], key), dest="trusted.bin")
    assert got["sha256"] == body_sha256(5000, key)


def test_a_ca_directory_trusted_instead_of_the_default_set(
    start_worker, client, pki, origins, tmp_path
):
    """A directory of PEM files prepared with `openssl rehash`, with DOWNLOAD_CA_ONLY."""
    shutil.copy(pki["ca"].path, tmp_path / "ca.pem")
    subprocess.run(["openssl", "rehash", str(tmp_path)], check=True)
    w = start_worker(DOWNLOAD_CA_BUNDLE=str(tmp_path), DOWNLOAD_CA_ONLY="true")
    assert run(client, w, url=_url(origins["good"], "only"), dest="only.bin")["size"] == 5000


def test_a_client_certificate_opens_an_origin_that_requires_one(start_worker, client, pki, origins):
    cert = pki["client"]
    w = start_worker(
        DOWNLOAD_CA_BUNDLE=str(pki["ca"].path),
        DOWNLOAD_CLIENT_CERT=str(cert),
        DOWNLOAD_CLIENT_KEY=str(cert.with_suffix(".key")),
    )
    assert run(client, w, url=_url(origins["mtls"], "mtls"), dest="mtls.bin")["size"] == 5000


def test_a_cut_download_resumes_over_tls(client, trusting, origins, key):
    size = 600_000
    url = _url(origins["good"], key, size, "&cut=400000&cut_times=1")
    got = run(client, trusting, url=url, dest="tls-resume.bin")
    assert got["resumed_from"] == 400_000 and got["sha256"] == body_sha256(size, key)
    assert [r.headers.get("Range") for r in origins["good"].stats.for_key(key)] == [
        None,
        "bytes=400000-",
    ]


@pytest.fixture(scope="module")
def proxied(start_worker, pki, proxy):
    return start_worker(
        DOWNLOAD_CA_BUNDLE=str(pki["ca"].path),
        DOWNLOAD_PROXY=proxy.url,
        DOWNLOAD_NO_PROXY="127.0.0.1, .example.invalid",
    )


def test_https_goes_through_the_proxy(client, proxied, proxy, origins, key):
    o = origins["good"]
    size = 600_000
    url = _url(o, key, size, "&cut=300000&cut_times=1")
    got = run(client, proxied, url=url, dest="via-proxy.bin")
    assert got["resumed_from"] == 300_000 and got["sha256"] == body_sha256(size, key)
    port = o.server_address[1]
    tunnels = [r for r in proxy.requests() if r.startswith(f"CONNECT localhost:{port} ")]
    assert len(tunnels) >= 2  # the cut attempt and the resumed one


def test_plain_http_goes_through_the_proxy_and_no_proxy_bypasses_it(
    client, proxied, proxy, origin, key
):
    by_name = f"http://localhost:{origin.server_address[1]}/bytes/3000?seed={key}&key={key}"
    assert run(client, proxied, url=by_name, dest="http-proxy.bin")["size"] == 3000
    assert any(line.startswith(f"GET {by_name}") for line in proxy.requests())
    direct = f"{origin.url}/bytes/3000?seed={key}d&key={key}d"
    assert run(client, proxied, url=direct, dest="http-direct.bin")["size"] == 3000
    assert not any(f"{key}d" in line for line in proxy.requests())


def test_redirects_and_size_caps_behave_the_same_through_the_proxy(
    client, proxied, origins, origin, key
):
    target = f"http://localhost:{origin.server_address[1]}/bytes/2000?seed={key}&key={key}"
    hop = f"{origins['good'].url}/bytes/1?key={key}r&redirect=1&to={quote(target, safe='')}"
    got = run(client, proxied, url=hop, dest="redirected.bin")
    # `key` is a secret parameter name: results show it masked.
    assert got["final_url"] == target.replace(f"key={key}", "key=***")
    assert got["sha256"] == body_sha256(2000, key)
    state, message = failure(
        client, proxied, url=_url(origins["good"], f"{key}c", 50_000), dest="cap.bin",
        max_bytes=10_000,
    )  # fmt: skip
    assert state == "FAILURE" and "10000-byte limit" in message


def test_a_loopback_target_is_refused_before_the_proxy_is_asked(
    start_worker, client, proxy, origin
):
    w = start_worker(DOWNLOAD_PROXY=proxy.url, DOWNLOAD_ALLOW_PRIVATE="false")
    seen = len(proxy.requests())
    url = f"http://localhost:{origin.server_address[1]}/bytes/10?key=refused-via-proxy"
    state, message = failure(client, w, url=url, dest="refused.bin")
    assert state == "FAILURE" and "not a public address" in message
    assert len(proxy.requests()) == seen and not origin.stats.for_key("refused-via-proxy")


def test_proxy_credentials_never_appear(start_worker, client, proxied, origins):
    run(client, proxied, url=_url(origins["good"], "creds"), dest="creds.bin")
    # A proxy that does not answer: the failure names it without its credentials.
    port = free_port()
    gone = f"http://downloads:{PROXY_PASSWORD}@127.0.0.1:{port}"
    w = start_worker(DOWNLOAD_PROXY=gone, DOWNLOAD_MAX_RETRIES="0")
    state, message = failure(client, w, url=_url(origins["good"], "gone"), dest="gone.bin")
    said = f"connection refused by the proxy 127.0.0.1:{port}, 1 attempt"
    assert state == "FAILURE" and message == said, message
    for text in (message, proxied.log(), w.log()):
        assert PROXY_PASSWORD not in text


def test_a_ca_bundle_that_cannot_be_loaded_stops_the_worker_at_start(start_worker, tmp_path):
    with pytest.raises(AssertionError, match="DOWNLOAD_CA_BUNDLE="):
        start_worker(DOWNLOAD_CA_BUNDLE=str(tmp_path / "missing.pem"))
