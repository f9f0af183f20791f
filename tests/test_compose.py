"""The compose files read as a deployer reads them, checked against what the code reads: every
setting passed to the worker (with the documented default), Redis durable and unpublished, Flower
behind basic auth on loopback with its history on a volume, one non-root image, only keys Compose
2.0 knows, every variable in .env.example, the observability profile wired to deploy/.
tests/test_compose_cli.py runs Docker Compose itself on the same files."""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from download_client.settings import documented
from tests.harness import ROOT

COMPOSE = ROOT / "docker-compose.yml"
RABBIT_COMPOSE = ROOT / "docker-compose.rabbitmq.yml"
CONSUMER = ROOT / "deploy" / "consumer.example.yml"
ENV_EXAMPLE = ROOT / ".env.example"
PRODUCTION = ROOT / "docs" / "production.md"
# Fixed for production, on purpose, rather than left to defaults.
FIXED = {"DOWNLOAD_DIR": "/data/downloads", "DOWNLOAD_ALLOW_PRIVATE": "false"}
# Overridable (an external Redis), with the bundled Redis on the compose network by default.
BUNDLED = {
    "CELERY_BROKER_URL": "redis://redis:6379/0",
    "CELERY_RESULT_BACKEND": "redis://redis:6379/1",
}
DEFAULT = re.compile(r"^\$\{(?P<var>\w+):-(?P<default>[^}]*)\}$")
# A variable compose interpolates (`$${...}` is the container's own, escaped from compose).
VARIABLE = re.compile(r"(?<!\$)\$\{(?P<var>\w+)(?::-(?P<default>[^}]*))?\}")
OBSERVABILITY = {"prometheus", "redis-exporter", "grafana"}


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load(COMPOSE)


@pytest.fixture(scope="module")
def rabbit_compose() -> dict[str, Any]:
    return load(RABBIT_COMPOSE)


def flower_options(compose: dict[str, Any]) -> dict[str, str]:
    """Flower's --name=value arguments: what follows `sh -c SCRIPT flower` in its command."""
    args = compose["services"]["flower"]["command"][4:]
    assert all(a.startswith("--") and "=" in a for a in args), args
    return dict(a[2:].split("=", 1) for a in args)


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """A service's volumes (short syntax), container path -> volume name or host path."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def dockerfile_dirs() -> set[str]:
    """Directories the image creates and hands to its user (`chown -R downloads /data`)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "chown -R downloads /data" in dockerfile
    return {d for line in re.findall(r"mkdir -p ((?:/\S+ ?)+)", dockerfile) for d in line.split()}


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
        expected = BUNDLED.get(var, default)
        assert m["default"] == expected, f"{var}: compose default {m['default']} != {expected}"
    assert set(env) <= {var for var, _ in documented()}, "compose sets what the code ignores"


def test_flower_shares_the_settings_and_needs_basic_auth(compose):
    flower = compose["services"]["flower"]
    env = flower["environment"]
    assert {k: v for k, v in env.items() if not k.startswith("FLOWER_")} == compose["x-settings"]
    # No default password, and no `${...:?}` either (that fails `config` and `down` too): the
    # command refuses to start Flower without one (run for real in test_flower_state_e2e.py).
    assert env["FLOWER_BASIC_AUTH"] == "${FLOWER_BASIC_AUTH:-}"
    shell, dash_c, script, zero = flower["command"][:4]
    assert (shell, dash_c, zero) == ("sh", "-c", "flower")
    assert script.startswith('test -n "$$FLOWER_BASIC_AUTH" || {')
    assert script.endswith('exec celery -A worker flower "$$@"')
    buckets = [float(b) for b in env["FLOWER_TASK_RUNTIME_METRIC_BUCKETS"].split(",")]
    assert buckets == sorted(buckets) and buckets[-1] >= float(
        dict(documented())["DOWNLOAD_TIME_LIMIT"]
    )
    assert all(p.startswith("127.0.0.1:") for p in flower["ports"])
    assert flower["depends_on"] == {"worker": {"condition": "service_healthy"}}
    assert flower["restart"] == "unless-stopped"  # restarted until the password is set


def test_flower_keeps_its_history_on_a_volume(compose):
    options = flower_options(compose)
    assert options["persistent"] == "True"
    assert options["state_save_interval"] == "60000"  # milliseconds in Flower 2.x: a minute
    directory = str(PurePosixPath(options["db"]).parent)
    volume = mounts(compose["services"]["flower"])[directory]
    assert volume in compose["volumes"], "the state file must be on a named volume"
    assert directory in dockerfile_dirs(), "the image must create it for the non-root user"


def test_flower_health_is_checked_on_its_open_endpoint(compose):
    check = compose["services"]["flower"]["healthcheck"]
    kind, python, dash_c, code = check["test"]
    assert (kind, python, dash_c) == ("CMD", "python", "-c")  # the image has no curl
    assert f"'http://127.0.0.1:{flower_options(compose)['port']}/healthcheck'" in code


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
    assert grace and grace["var"] == "WORKER_STOP_GRACE"
    assert int(grace["default"].rstrip("s")) > int(dict(documented())["DOWNLOAD_SHUTDOWN_GRACE"])
    assert worker["stop_signal"] == "SIGTERM"  # warm shutdown; SIGQUIT/SIGINT twice is cold
    assert "inspect ping" in " ".join(worker["healthcheck"]["test"])
    assert any(v.endswith(":/data/downloads") for v in worker["volumes"])


def test_workers_scale_with_names_of_their_own(compose):
    """`--scale worker=N`: a fixed hostname or container_name would give every replica one
    Celery node name (or refuse to scale); a published port would clash."""
    worker = compose["services"]["worker"]
    assert not {"hostname", "container_name", "ports"} & set(worker)
    assert "celery@$$HOSTNAME" in worker["healthcheck"]["test"][1]  # each replica pings itself


def test_one_non_root_image(compose):
    worker, flower = compose["services"]["worker"], compose["services"]["flower"]
    assert worker["image"] == flower["image"] and worker["build"] == flower["build"] == "."
    dockerfile = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    # Each volume starts as a copy of the image's directory, so the user owns it.
    for service in (worker, flower):
        assert set(mounts(service)) <= dockerfile_dirs()


# The keys Docker Compose 2.0 already knew, as far as these files use them. Newer ones
# (healthcheck `start_interval`: Compose 2.20.2 with Engine 25; `depends_on.required`: 2.20;
# `include`; `develop`) are refused or ignored by older releases.
COMPOSE_2_0 = {
    "top": {"services", "volumes", "x-settings", "x-image", "x-broker"},
    "service": {
        *("image", "build", "command", "entrypoint", "environment", "expose", "ports"),
        *("volumes", "depends_on", "healthcheck", "restart", "stop_grace_period"),
        *("stop_signal", "hostname", "profiles"),
    },
    "healthcheck": {"test", "interval", "timeout", "retries", "start_period"},
    "depends_on": {"condition"},
    "condition": {"service_started", "service_healthy"},
}
MINIMUM = "Docker Compose 2.0 or later"


@pytest.mark.parametrize("path", [COMPOSE, RABBIT_COMPOSE, CONSUMER], ids=lambda p: p.name)
def test_only_keys_the_stated_compose_version_knows(path):
    doc = load(path)
    assert set(doc) <= COMPOSE_2_0["top"]
    for name, service in doc["services"].items():
        assert set(service) <= COMPOSE_2_0["service"], name
        assert set(service.get("healthcheck", {})) <= COMPOSE_2_0["healthcheck"], name
        for dependency in service.get("depends_on", {}).values():
            assert set(dependency) <= COMPOSE_2_0["depends_on"], name
            assert dependency["condition"] in COMPOSE_2_0["condition"], name


def test_the_minimum_compose_version_is_stated():
    header = COMPOSE.read_text().split("\nx-settings", 1)[0].replace("#", "")
    assert f"Needs {MINIMUM}" in " ".join(header.split())
    assert MINIMUM in " ".join(PRODUCTION.read_text().split())


def env_example() -> dict[str, tuple[str, str, bool]]:
    """.env.example: name -> (value shown, its comment, set or left commented out)."""
    entries: dict[str, tuple[str, str, bool]] = {}
    comment = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        m = re.fullmatch(r"(?P<off>#)?(?P<var>[A-Z][A-Z0-9_]*)=(?P<value>.*)", line)
        if m:
            assert m["var"] not in entries, f"{m['var']} twice"
            entries[m["var"]] = (m["value"], comment, not m["off"])
            comment = ""
        elif line.startswith("# "):
            comment = line[2:]
        else:
            comment = ""
    return entries


def compose_variables() -> dict[str, str]:
    """Every variable the compose files interpolate, with its default ("" when none)."""
    found: dict[str, str] = {}
    for path in (COMPOSE, RABBIT_COMPOSE):
        for m in VARIABLE.finditer(path.read_text()):
            found.setdefault(m["var"], m["default"] or "")
    return found


def test_env_example_lists_every_variable_with_its_default_and_a_comment():
    entries, variables = env_example(), compose_variables()
    assert set(entries) == set(variables)
    for var, (value, comment, is_set) in entries.items():
        assert comment, f"{var} has no comment above it"
        assert value == variables[var], f"{var}: .env.example shows {value}, compose {variables}"
        # Only what `up` needs is set (empty, to fill in); the rest keeps compose's default.
        assert is_set == (var == "FLOWER_BASIC_AUTH"), var


def test_rabbitmq_override_moves_only_the_broker(compose, rabbit_compose):
    services = rabbit_compose["services"]
    broker = rabbit_compose["x-broker"]
    assert set(broker) == {"CELERY_BROKER_URL"}  # results, claims and counters stay in Redis
    assert broker["CELERY_BROKER_URL"].startswith("amqp://downloads:${RABBITMQ_PASSWORD:-}@")
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
    assert rabbit["environment"]["RABBITMQ_DEFAULT_PASS"] == "${RABBITMQ_PASSWORD:-}"
    _, _, script = rabbit["command"]  # its refusal, run: tests/test_compose_cli.py
    assert script.startswith('test -n "$$RABBITMQ_DEFAULT_PASS" || {')
    assert script.endswith("exec docker-entrypoint.sh rabbitmq-server")
    assert "ping" in rabbit["healthcheck"]["test"]


def test_rabbitmq_consumer_timeout_outlasts_a_download(rabbit_compose):
    """With late acks RabbitMQ closes a consumer that holds a message past consumer_timeout: it
    must outlast the hard time limit and the backoff cap, as DOWNLOAD_VISIBILITY_TIMEOUT does."""
    args = rabbit_compose["services"]["rabbitmq"]["environment"][
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"
    ]
    m = re.search(r"-rabbit consumer_timeout (\d+)", args)
    assert m, args
    defaults = {var: float(default) for var, default in documented()
                if var in ("DOWNLOAD_VISIBILITY_TIMEOUT", "DOWNLOAD_TIME_LIMIT",
                           "DOWNLOAD_RETRY_BACKOFF_MAX")}  # fmt: skip
    assert int(m[1]) >= defaults["DOWNLOAD_VISIBILITY_TIMEOUT"] * 1000
    assert defaults["DOWNLOAD_VISIBILITY_TIMEOUT"] > (
        defaults["DOWNLOAD_TIME_LIMIT"] + defaults["DOWNLOAD_RETRY_BACKOFF_MAX"]
    )


def test_observability_is_a_profile_on_loopback(compose):
    services = compose["services"]
    profiled = {name for name, s in services.items() if "profiles" in s}
    assert profiled == OBSERVABILITY
    for name in OBSERVABILITY:
        assert services[name]["profiles"] == ["observability"]
        assert all(p.startswith("127.0.0.1:") for p in services[name].get("ports", [])), name
        for source in mounts(services[name]):
            host = mounts(services[name])[source]
            if host.startswith("./"):
                assert (ROOT / host).is_dir(), host


def test_prometheus_scrapes_flower_and_the_queue_length(compose):
    services = compose["services"]
    prometheus = services["prometheus"]
    etc = {t: h for t, h in mounts(prometheus).items() if h.startswith("./")}
    assert etc == {"/etc/prometheus": "./deploy/prometheus"}
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    config = load(ROOT / "deploy/prometheus/prometheus.yml")
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in config["scrape_configs"]
    }
    # /metrics is outside Flower's basic auth: no credentials in the scrape.
    assert targets["flower"] == [f"flower:{flower_options(compose)['port']}"]
    assert targets["redis"] == ["redis-exporter:9121"]
    exporter = services["redis-exporter"]
    assert exporter["expose"] == ["9121"]
    assert exporter["environment"]["REDIS_ADDR"] == compose["x-settings"]["CELERY_BROKER_URL"]
    assert exporter["environment"]["REDIS_EXPORTER_CHECK_SINGLE_KEYS"] == "db0=celery"
    assert config["rule_files"] == ["alerts.yml"]


def test_grafana_is_provisioned_with_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    volumes = mounts(grafana)
    provisioning = ROOT / volumes["/etc/grafana/provisioning"]
    datasource = load(provisioning / "datasources/prometheus.yml")["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and "9090:9090" in str(
        compose["services"]["prometheus"]["ports"]
    )
    provider = load(provisioning / "dashboards/downloads.yml")["providers"][0]
    dashboards = ROOT / volumes[provider["options"]["path"]]
    board = json.loads((dashboards / "downloads.json").read_text())
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"]
        assert all(t["datasource"]["uid"] == datasource["uid"] for t in panel["targets"])
    assert grafana["environment"]["GF_SECURITY_ADMIN_PASSWORD"] == "${GRAFANA_ADMIN_PASSWORD:-}"
    assert grafana["entrypoint"][2].startswith('test -n "$$GF_SECURITY_ADMIN_PASSWORD" || {')


def test_consumer_example_reads_the_downloads_volume_read_only(compose):
    consumer = load(CONSUMER)["services"]["consumer"]
    worker_dir = compose["x-settings"]["DOWNLOAD_DIR"]
    assert consumer["volumes"] == [f"downloads:{worker_dir}:ro"]
    assert f"-path {worker_dir}/.partial -prune" in consumer["command"][2]
