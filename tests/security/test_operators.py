"""The shipped ways to run it are safe by default. Text checks only (no
Docker here): Flower always behind basic auth, Redis never published, the image not root."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def service(compose: str, name: str) -> str:
    """The text of one top-level service block of docker-compose.yml."""
    match = re.search(rf"^  {name}:\n((?:    .*\n|\s*\n)+)", compose, re.MULTILINE)
    assert match, f"no service {name!r} in docker-compose.yml"
    return match.group(1)


def test_compose_publishes_no_redis_and_flower_only_on_loopback_with_auth() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "ports:" not in service(compose, "redis")
    flower = service(compose, "flower")
    # Passed through, and Flower's start refuses without it (test_compose_cli runs that check).
    assert "FLOWER_BASIC_AUTH: ${FLOWER_BASIC_AUTH:-}" in flower
    assert 'test -n "$$FLOWER_BASIC_AUTH" ||' in flower, "auth not required"
    assert "FLOWER_UNAUTHENTICATED_API" not in compose
    ports = re.findall(r'"([^"]*5555[^"]*)"', flower.split("ports:", 1)[1].split("\n", 1)[0])
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports


def test_the_image_runs_as_a_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert users and users[-1] not in ("root", "0")


def test_make_run_binds_loopback_and_always_sets_flower_auth() -> None:
    script = (ROOT / "scripts" / "stack.sh").read_text()
    flower = next(line for line in script.splitlines() if "celery -A worker flower" in line)
    assert "--address=127.0.0.1" in flower
    # The password reaches Flower through the environment (never argv, which `ps` shows).
    assert 'export FLOWER_BASIC_AUTH="admin:' in script and "--basic-auth" not in script
    assert re.search(r'if \[ -z "\$\{FLOWER_BASIC_AUTH:-\}" \]', script), "no default password"
    assert "redis-server" in script and "--bind 127.0.0.1" in script
    assert "FLOWER_UNAUTHENTICATED_API" not in script
