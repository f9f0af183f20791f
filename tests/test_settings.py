"""The settings object and the public surface other services depend on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from download_client.settings import Settings, SettingsError, documented

ROOT = Path(__file__).resolve().parent.parent


def test_defaults_are_the_documented_ones():
    s = Settings.from_env({})
    assert s.broker_url == "redis://localhost:6379/0"
    assert s.result_backend == "redis://localhost:6379/1"
    assert s.download_dir == Path("downloads") and s.allow_private is False
    assert s.max_memory_per_child == 262144 and s.max_tasks_per_child == 1000


def test_every_setting_is_in_the_settings_table_with_its_default():
    readme = (ROOT / "docs" / "settings.md").read_text()
    for var, default in documented():
        cell = f"`{re.escape(default)}`" if default else "unset"
        assert re.search(rf"\| `{var}` \| {cell} \|", readme), var


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DOWNLOAD_READ_TIMEOUT": "soon"}, "DOWNLOAD_READ_TIMEOUT='soon': expected a number"),
        ({"DOWNLOAD_READ_TIMEOUT": "nan"}, "DOWNLOAD_READ_TIMEOUT='nan': expected a number"),
        ({"WORKER_CONCURRENCY": "2.5"}, "WORKER_CONCURRENCY='2.5': expected a whole number"),
        ({"DOWNLOAD_MAX_RETRIES": "six"}, "DOWNLOAD_MAX_RETRIES='six': expected a whole number"),
        ({"DOWNLOAD_MAX_BYTES": "0"}, "must be greater than 0"),
        ({"DOWNLOAD_MAX_RETRIES": "-1"}, "must be 0 or more"),
        ({"DOWNLOAD_ALLOW_PRIVATE": "maybe"}, "expected true/false"),
        ({"DOWNLOAD_SOFT_TIME_LIMIT": "100", "DOWNLOAD_TIME_LIMIT": "50"}, "below"),
        ({"DOWNLOAD_VISIBILITY_TIMEOUT": "3000"}, "VISIBILITY_TIMEOUT must exceed"),
        ({"DOWNLOAD_GROUP_WEIGHTS": "crawl"}, "'crawl': expected group=N"),
        ({"DOWNLOAD_GROUP_WEIGHTS": "Crawl!=2"}, "'Crawl!=2': expected group=N (a group name"),
        ({"DOWNLOAD_GROUP_WEIGHTS": "crawl=0"}, "a weight is a number above 0"),
        ({"DOWNLOAD_GROUP_WEIGHTS": "crawl=x"}, "'x': a weight is a number above 0"),
        ({"DOWNLOAD_GROUP_WEIGHTS": "crawl=nan"}, "'nan': a weight is a number above 0"),
        (
            {"DOWNLOAD_GROUP_WEIGHTS": "a=1,a=2"},
            "DOWNLOAD_GROUP_WEIGHTS='a=1,a=2': 'a' is given twice",
        ),
        (
            {"DOWNLOAD_GROUP_LIMITS": "crawl=-1"},
            "DOWNLOAD_GROUP_LIMITS='crawl=-1': must be 0 or more",
        ),
        ({"DOWNLOAD_GROUP_LIMITS": "crawl=1.5"}, "expected a whole number"),
        ({"DOWNLOAD_HOST_RATE": "fast"}, "DOWNLOAD_HOST_RATE='fast': 'fast': expected bytes per"),
        ({"DOWNLOAD_HOST_RATE": "5T"}, "expected bytes per second, e.g. 5000000, 5M or 4Mi"),
        ({"DOWNLOAD_WORKER_RATE": "-5M"}, "DOWNLOAD_WORKER_RATE='-5M'"),
        ({"DOWNLOAD_WORKER_RATE": "60Ki"}, "a rate is at least 64Ki (65536) bytes per second"),
        ({"DOWNLOAD_HOST_RATE": "9" * 400}, "too large for a rate"),
        ({"DOWNLOAD_HOST_RATES": "cdn.example=5M"}, "expected scheme://host[:port]=RATE"),
        (
            {"DOWNLOAD_HOST_RATES": "http://a.example=1M,http://a.example:80=2M"},
            "'http://a.example:80' is given twice",
        ),
        ({"DOWNLOAD_HOST_LIMITS": "http://a=1,http://a:80=2"}, "'http://a:80' is given twice"),
        ({"DOWNLOAD_DISK_MARGIN": "lots"}, "DOWNLOAD_DISK_MARGIN='lots': 'lots': expected bytes"),
        ({"DOWNLOAD_DISK_MARGIN": "-1G"}, "expected bytes to keep free, e.g. 10Gi, 500M or 0"),
        ({"DOWNLOAD_DISK_STEP": "512Ki"}, "a step is at least 1Mi (1048576) bytes"),
    ],
)
def test_bad_values_are_refused_naming_the_variable(env, message):
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.from_env(env)


def test_bandwidth_budgets_parse_with_units():
    s = Settings.from_env(
        {
            "DOWNLOAD_HOST_RATE": "5M",
            "DOWNLOAD_HOST_RATES": "https://CDN.example.com=20MB, http://10.0.0.5:8080=512Ki",
            "DOWNLOAD_WORKER_RATE": "1.5G",
        }
    )
    assert s.rate_limit("http://other.example:80") == 5_000_000
    assert s.rate_limit("https://cdn.example.com:443") == 20_000_000
    assert s.rate_limit("http://10.0.0.5:8080") == 512 * 1024
    assert s.worker_rate == 1_500_000_000
    assert Settings.from_env({}).rate_limit("http://a:80") == 0  # none by default


def test_disk_reservations_are_off_until_a_margin_is_given():
    assert Settings.from_env({}).disk_margin is None
    s = Settings.from_env({"DOWNLOAD_DISK_MARGIN": "10Gi", "DOWNLOAD_DISK_STEP": "16M"})
    assert (s.disk_margin, s.disk_step) == (10 * 2**30, 16_000_000)
    assert Settings.from_env({"DOWNLOAD_DISK_MARGIN": "0"}).disk_margin == 0  # on, none kept


def test_booleans_and_numbers_parse():
    s = Settings.from_env({"DOWNLOAD_ALLOW_PRIVATE": "yes", "WORKER_MAX_TASKS_PER_CHILD": "0"})
    assert s.allow_private is True and s.max_tasks_per_child == 0


def test_celery_configuration_is_safe_by_construction():
    from worker.celery_app import celery_config

    conf = celery_config(Settings.from_env({}))
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["worker_proc_alive_timeout"] >= 30  # a slow child start is not killed
    assert conf["worker_send_task_events"] and conf["task_track_started"]
    vt = conf["broker_transport_options"]["visibility_timeout"]
    assert vt == conf["result_backend_transport_options"]["visibility_timeout"]
    assert vt > conf["task_time_limit"] > conf["task_soft_time_limit"]
    assert conf["worker_max_memory_per_child"] == 262144


def test_the_public_task_name_and_result_keys_are_pinned():
    from download_client import RESULT_KEYS, TASK_NAME
    from tasks.fetch import FetchTask
    from worker import app

    assert TASK_NAME == "downloads.fetch" and FetchTask.name == TASK_NAME
    assert isinstance(app.tasks[TASK_NAME], FetchTask)
    assert RESULT_KEYS == (
        "url",
        "final_url",
        "path",
        "size",
        "sha256",
        "content_type",
        "http_status",
        "attempts",
        "resumed_from",
        "skipped",
        "elapsed_s",
        "worker",
        "content_encoding",
        "waited_s",
        "retried_s",
        "deadline",
        "throttled_s",
        "sources",
    )


def test_default_destinations_are_readable_and_never_collide():
    from download_client.arguments import default_dest

    a = default_dest("https://example.com/img/cat.jpg")
    b = default_dest("https://example.com/other/cat.jpg")
    assert re.fullmatch(r"cat-[0-9a-f]{10}\.jpg", a) and a != b
    assert re.fullmatch(r"download-[0-9a-f]{10}", default_dest("https://example.com/"))
    assert "/" not in default_dest("https://example.com/a/..%2F..%2Fetc%2Fpasswd")


@pytest.mark.parametrize(
    ("broker", "results"),
    [
        ("redis://localhost:6379/0", "redis://localhost:6379/1"),
        ("redis://h:6379", "redis://h:6379/1"),
        ("redis://h", "redis://h/1"),
        (
            "redis://:pw@h:6380/5?health_check_interval=10",
            "redis://:pw@h:6380/1?health_check_interval=10",
        ),
        (
            "rediss://u:p@h:6379/0?ssl_cert_reqs=required",
            "rediss://u:p@h:6379/1?ssl_cert_reqs=required",
        ),
    ],
)
def test_results_live_in_database_1_of_the_brokers_redis(broker, results):
    from download_client.settings import result_backend_for

    assert Settings.from_env({"CELERY_BROKER_URL": broker}).result_backend == results
    assert result_backend_for(broker) == results
    given = {"CELERY_BROKER_URL": broker, "CELERY_RESULT_BACKEND": "redis://other:6379/4"}
    assert Settings.from_env(given).result_backend == "redis://other:6379/4"


def test_a_broker_that_is_not_redis_needs_a_result_backend():
    env = {"CELERY_BROKER_URL": "amqp://guest:hunter2@rabbit:5672//"}
    with pytest.raises(SettingsError, match="CELERY_RESULT_BACKEND is required") as info:
        Settings.from_env(env)
    assert "hunter2" not in str(info.value)
    both = {**env, "CELERY_RESULT_BACKEND": "redis://r:6379/1"}
    assert Settings.from_env(both).result_backend == "redis://r:6379/1"


@pytest.mark.parametrize("backend", ["rpc://", "db+postgresql://u:hunter2@db/r", "file:///tmp"])
def test_the_result_backend_must_be_a_redis(backend):
    """Claims, delivery counts, slots and notes live beside the results: no other store holds
    them, so another backend is refused at start rather than half supported."""
    env = {"CELERY_BROKER_URL": "redis://h:6379/0", "CELERY_RESULT_BACKEND": backend}
    with pytest.raises(SettingsError, match="must be a redis:// or rediss:// URL") as info:
        Settings.from_env(env)
    assert "hunter2" not in str(info.value)


def test_every_component_reads_the_same_result_backend():
    from download_client.client import connect
    from worker.celery_app import celery_config

    s = Settings.from_env({"CELERY_BROKER_URL": "redis://h:6379"})
    assert celery_config(s)["result_backend"] == "redis://h:6379/1"
    assert connect(s).conf.result_backend == "redis://h:6379/1"


@pytest.mark.parametrize("scheme", ["redis", "rediss"])
def test_the_worker_stores_results_through_the_durable_backend(scheme, monkeypatch):
    from download_client.client import connect
    from worker.backend import DurableRedisBackend
    from worker.celery_app import create_app

    url = f"{scheme}://:hunter2@h:6379/1" + (
        "?ssl_cert_reqs=required" if scheme == "rediss" else ""
    )
    # Celery reads this variable over the configuration: the backend class must not depend on it.
    monkeypatch.setenv("CELERY_RESULT_BACKEND", url)
    settings = Settings.from_env({"CELERY_BROKER_URL": url, "CELERY_RESULT_BACKEND": url})
    app = create_app(settings)
    assert type(app.backend) is DurableRedisBackend
    assert app.backend.url == url
    # Nothing of the worker's choice of class shows in the URL producers read.
    assert app.conf.result_backend == connect(settings).conf.result_backend == url
    assert "hunter2" not in app.backend.as_uri()


@pytest.mark.parametrize(
    ("url", "name"),
    [
        ("https://x/%E7%8C%AB.jpg", r"猫-[0-9a-f]{10}\.jpg"),
        ("https://x/caf%C3%A9", r"café-[0-9a-f]{10}"),
        ("https://x/%F0%9F%98%80", r"download-[0-9a-f]{10}"),
        ("https://x/--rf", r"rf-[0-9a-f]{10}"),
        ("https://x/-", r"download-[0-9a-f]{10}"),
        ("https://x/.bashrc", r"bashrc-[0-9a-f]{10}"),
    ],
)
def test_default_names_from_any_url_are_readable_and_never_an_option(url, name):
    from download_client.arguments import check_dest, default_dest

    made = default_dest(url)
    assert re.fullmatch(name, made) and not made.startswith(("-", "."))
    check_dest(made)
    long = default_dest("https://x/" + "%E7%8C%AB" * 300 + ".tar")
    assert len(long.encode()) <= 255 and long.endswith(".tar")
