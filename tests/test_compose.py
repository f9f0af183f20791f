"""docker-compose.yml checked against what the code reads: every setting passed to the worker
(with the documented default), Redis durable and unpublished, Flower behind basic auth on
loopback, one non-root image. `docker compose config` runs only where the plugin exists."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from download_client.settings import documented
from tests.harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
# Fixed for the compose network or for production, on purpose, rather than left to defaults.
FIXED = {
    "CELERY_BROKER_URL": "redis://redis:6379/0",
    "CELERY_RESULT_BACKEND": "redis://redis:6379/1",
    "DOWNLOAD_DIR": "/data/downloads",
    "DOWNLOAD_ALLOW_PRIVATE": "false",
}
DEFAULT = re.compile(r"^\$\{(?P<var>\w+):-(?P<default>[^}]*)\}$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())  # type: ignore[no-any-return]


def test_every_setting_reaches_the_worker_with_its_documented_default(compose):
    env = compose["services"]["worker"]["environment"]
    assert env is compose["x-settings"]  # the anchor itself, not a copy that can drift
    for var, default in documented():
        assert var in env, f"{var} is read by the code but not passed to the worker"
        value = str(env[var])
        if var in FIXED:
            assert value == FIXED[var]
            continue
        m = DEFAULT.match(value)
        assert m and m["var"] == var, f"{var}: expected ${{{var}:-default}}, got {value}"
        assert m["default"] == default, f"{var}: compose default {m['default']} != {default}"
    assert set(env) <= {var for var, _ in documented()}, "compose sets what the code ignores"


def test_flower_shares_the_settings_and_needs_basic_auth(compose):
    flower = compose["services"]["flower"]
    env = flower["environment"]
    assert {k: v for k, v in env.items() if not k.startswith("FLOWER_")} == compose["x-settings"]
    assert env["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")  # no default password
    buckets = [float(b) for b in env["FLOWER_TASK_RUNTIME_METRIC_BUCKETS"].split(",")]
    assert buckets == sorted(buckets) and buckets[-1] >= float(
        dict(documented())["DOWNLOAD_TIME_LIMIT"]
    )
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])
    assert flower["depends_on"] == {"worker": {"condition": "service_healthy"}}
    assert "flower" in flower["command"]


def test_redis_is_durable_unpublished_and_checked(compose):
    redis = compose["services"]["redis"]
    assert "ports" not in redis
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--maxmemory-policy noeviction" in command
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "ping" in redis["healthcheck"]["test"]
    assert "ports" not in compose["services"]["worker"]


def test_worker_waits_for_redis_stops_warm_and_answers_ping(compose):
    worker = compose["services"]["worker"]
    assert worker["depends_on"] == {"redis": {"condition": "service_healthy"}}
    grace = DEFAULT.match(worker["stop_grace_period"])
    assert grace and int(grace["default"].rstrip("s")) >= 60
    assert worker["stop_signal"] == "SIGTERM"  # warm shutdown; SIGQUIT/SIGINT twice is cold
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])
    assert any(v.endswith(":/data/downloads") for v in worker["volumes"])


def test_one_non_root_image(compose):
    worker, flower = compose["services"]["worker"], compose["services"]["flower"]
    assert worker["image"] == flower["image"] and worker["build"] == flower["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="no `docker compose` plugin on this machine")
def test_docker_compose_config_accepts_the_file():
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "--quiet"],
        env={"FLOWER_BASIC_AUTH": "ops:secret", "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


RABBIT_COMPOSE = ROOT / "docker-compose.rabbitmq.yml"


@pytest.fixture(scope="module")
def rabbit_compose() -> dict[str, Any]:
    return yaml.safe_load(RABBIT_COMPOSE.read_text())  # type: ignore[no-any-return]


def test_rabbitmq_override_moves_only_the_broker(compose, rabbit_compose):
    services = rabbit_compose["services"]
    broker = rabbit_compose["x-broker"]
    assert set(broker) == {"CELERY_BROKER_URL"}  # results, claims and counters stay in Redis
    assert broker["CELERY_BROKER_URL"].startswith("amqp://downloads:${RABBITMQ_PASSWORD:?")
    assert broker["CELERY_BROKER_URL"].endswith("@rabbitmq:5672//")
    assert services["worker"]["environment"] is broker
    assert services["flower"]["environment"] is broker
    assert set(services) == {"rabbitmq", "worker", "flower"}
    assert services["worker"]["depends_on"] == {
        **compose["services"]["worker"]["depends_on"],
        "rabbitmq": {"condition": "service_healthy"},
    }


def test_rabbitmq_is_durable_unpublished_and_needs_a_password(rabbit_compose):
    rabbit = rabbit_compose["services"]["rabbitmq"]
    assert "ports" not in rabbit and rabbit["expose"] == ["5672"]
    assert rabbit["hostname"] == "rabbitmq"  # the node name, hence the data directory, is stable
    assert any(v.endswith(":/var/lib/rabbitmq") for v in rabbit["volumes"])
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"].startswith("${RABBITMQ_PASSWORD:?")
    assert "ping" in rabbit["healthcheck"]["test"]


def test_rabbitmq_consumer_timeout_outlasts_a_download(rabbit_compose):
    """With late acks RabbitMQ closes a consumer that holds a message past consumer_timeout: it
    must outlast the hard time limit and the backoff cap, as DOWNLOAD_VISIBILITY_TIMEOUT does."""
    args = rabbit_compose["services"]["rabbitmq"]["environment"][
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"
    ]
    m = re.search(r"-rabbit consumer_timeout (\d+)", args)
    assert m, args
    defaults = {var: float(default) for var, default in documented() if default[:1].isdigit()}
    assert int(m[1]) >= defaults["DOWNLOAD_VISIBILITY_TIMEOUT"] * 1000
    assert defaults["DOWNLOAD_VISIBILITY_TIMEOUT"] > (
        defaults["DOWNLOAD_TIME_LIMIT"] + defaults["DOWNLOAD_RETRY_BACKOFF_MAX"]
    )


@pytest.mark.skipif(not _compose_plugin(), reason="no `docker compose` plugin on this machine")
def test_docker_compose_config_accepts_the_rabbitmq_override():
    done = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "-f", str(RABBIT_COMPOSE), "config", "--quiet"],
        env={
            "FLOWER_BASIC_AUTH": "ops:secret",
            "RABBITMQ_PASSWORD": "secret",
            "PATH": "/usr/bin:/bin:/usr/local/bin",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
