"""What a caller sees of its own URL in results, events and logs: the submitted text, with only
passwords and the values of named secret parameters masked."""

from __future__ import annotations

import pytest

from download_client import redact
from download_client.redact import SECRET_PARAMS, redact_url
from download_client.settings import Settings, SettingsError


@pytest.mark.parametrize(
    "url",
    [
        "https://h.test/a?author=bob&design=flat&keyword=cat&code=200",
        "https://h.test/a?",
        "https://h.test/a#section-2",
        "https://h.test/a?q=1#top",
        "https://h.test/caf%C3%A9/ni%F1o?x=%20y&&z",
        "https://h.test/猫.jpg?名前=値",
        "https://h.test/a?monkey=1&tokenizer=bpe&signature_version=4&se=2030&sp=r&sv=2022",
        "HTTPS://H.TEST:8443/a;p=1?b=2",
    ],
)
def test_a_url_without_secrets_comes_back_exactly_as_submitted(url):
    assert redact_url(url) == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://h.test/a?token=t&page=2", "https://h.test/a?token=***&page=2"),
        ("https://h.test/a?ACCESS_TOKEN=t", "https://h.test/a?ACCESS_TOKEN=***"),
        ("https://h.test/a?key=AIza&q=x", "https://h.test/a?key=***&q=x"),
        ("https://h.test/a?x-amz-security-token=t", "https://h.test/a?x-amz-security-token=***"),
        ("https://h.test/a?sv=1&se=2&sp=r&sig=abc", "https://h.test/a?sv=1&se=2&sp=r&sig=***"),
        ("https://h.test/a?access%5Ftoken=t", "https://h.test/a?access%5Ftoken=***"),
        ("https://u:p@h.test/a?", "https://u:***@h.test/a?"),
        ("https://h.test/a?token", "https://h.test/a?token"),  # no value: nothing to hide
        ("https://h.test/cb#access_token=t&state=s", "https://h.test/cb#access_token=***&state=s"),
    ],
)
def test_secret_values_are_masked_and_nothing_else_changes(url, shown):
    assert redact_url(url) == shown


def test_the_documented_list_is_in_the_contract():
    from tests.harness import ROOT

    readme = (ROOT / "docs" / "contract.md").read_text().lower()
    for name in SECRET_PARAMS:
        assert f"`{name}`" in readme, name


def test_the_setting_adds_names_and_refuses_bad_ones(monkeypatch):
    monkeypatch.setattr(redact, "_extra", set())
    s = Settings.from_env({"DOWNLOAD_REDACT_PARAMS": "ticket, Hmac"})
    assert s.redact_params == ("ticket", "Hmac")
    assert redact_url("https://h.test/a?ticket=1&hmac=2") == "https://h.test/a?ticket=1&hmac=2"
    redact.add_secret_params(s.redact_params)
    assert redact_url("https://h.test/a?ticket=1&HMAC=2") == "https://h.test/a?ticket=***&HMAC=***"
    with pytest.raises(SettingsError, match="DOWNLOAD_REDACT_PARAMS"):
        Settings.from_env({"DOWNLOAD_REDACT_PARAMS": "a=b"})


def test_shown_kwargs_start_with_the_url_and_end_with_the_headers():
    from download_client.redact import redact_reprs

    kwargs = {
        "headers": {"Authorization": "Bearer x"},
        "max_bytes": 10,
        "dest": "a/b.bin",
        "url": "https://example.com/f?token=s3cret",
    }
    _, shown = redact_reprs((), kwargs)
    assert shown == (
        "{'url': 'https://example.com/f?token=***', 'dest': 'a/b.bin', 'max_bytes': 10, "
        "'headers': {'Authorization': '***'}}"
    )
