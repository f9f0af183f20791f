"""The egress settings on their own: NO_PROXY matching, what the settings refuse, and the TLS
context's trust."""

from __future__ import annotations

import ssl

import pytest

from download_client.settings import Settings, SettingsError
from tasks.core.egress import Egress, EgressError, bypasses
from tasks.core.failures import on_request


@pytest.mark.parametrize(
    ("host", "rules", "bypassed"),
    [
        ("files.example.com", ("example.com",), True),
        ("files.example.com", (".example.com",), True),
        ("example.com", (".example.com",), True),
        ("badexample.com", ("example.com",), False),
        ("10.1.2.3", ("10.0.0.0/8",), True),
        ("10.1.2.3", ("10.1.2.3",), True),
        ("11.1.2.3", ("10.0.0.0/8",), False),
        ("anything", ("*",), True),
        ("anything", (), False),
    ],
)
def test_no_proxy_rules(host, rules, bypassed):
    assert bypasses(host, rules) is bypassed


def test_the_proxy_is_chosen_per_url():
    egress = Egress(proxy="http://p:3128", no_proxy=("internal.example",))
    assert egress.proxy_for("https://cdn.example.org/a") == "http://p:3128"
    assert egress.proxy_for("https://files.internal.example/a") is None
    assert Egress().proxy_for("https://cdn.example.org/a") is None


@pytest.mark.parametrize(
    ("env", "error"),
    [
        ({"DOWNLOAD_PROXY": "socks5://p:1080"}, "DOWNLOAD_PROXY"),
        ({"DOWNLOAD_PROXY": "http://"}, "DOWNLOAD_PROXY"),
        ({"DOWNLOAD_CA_ONLY": "true"}, "DOWNLOAD_CA_BUNDLE"),
        ({"DOWNLOAD_CLIENT_KEY": "/k.pem"}, "DOWNLOAD_CLIENT_CERT"),
    ],
)
def test_settings_refuse_what_cannot_work(env, error):
    with pytest.raises(SettingsError, match=error):
        Settings.from_env(env)


def test_a_missing_ca_file_is_a_clear_error(tmp_path):
    with pytest.raises(EgressError, match="DOWNLOAD_CA_BUNDLE"):
        Egress(ca_bundle=str(tmp_path / "missing.pem")).ssl_context()


def test_ca_only_trusts_nothing_else(tmp_path):
    from tests.tls import CA

    ca = CA(tmp_path)
    assert len(Egress(ca_bundle=str(ca.path), ca_only=True).ssl_context().get_ca_certs()) == 1
    assert len(Egress(ca_bundle=str(ca.path)).ssl_context().get_ca_certs()) > 100


def test_a_verification_error_is_permanent_and_a_reset_is_not():
    cert = ssl.SSLCertVerificationError(1, "certificate verify failed")
    cert.verify_message = "certificate has expired"
    import requests

    bad = requests.exceptions.SSLError(cert)
    mapped = on_request(bad, "https://files.example.org:8443/a?token=x")
    assert type(mapped).__name__ == "PermanentError"
    assert str(mapped) == (
        "TLS: certificate problem: certificate has expired (https://files.example.org:8443)"
    )
    reset = requests.exceptions.SSLError(ConnectionResetError(104, "reset"))
    assert type(on_request(reset, "https://files.example.org/a")).__name__ == "TransientError"
