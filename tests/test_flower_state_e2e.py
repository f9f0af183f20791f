"""The compose file's Flower, run for real against the private Redis and a real worker: its
command (the password check, then `celery -A worker flower` with the file's options) keeps the
task history across a crash, its healthcheck passes while it answers, and it refuses to start
without FLOWER_BASIC_AUTH. Only what points outside this machine's loopback changes: the address,
the port, the state file's directory, and the save interval (the file's minute, shortened so the
test does not wait for it)."""

from __future__ import annotations

import os
import shelve
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.flower_process import USER, Flower
from tests.harness import ROOT, TASK, wait_for, worker_env
from tests.test_compose import COMPOSE

SAVE_INTERVAL_MS = 300


def flower_service() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]["flower"]  # type: ignore[no-any-return]


def container_argv(parts: list[str]) -> list[str]:
    """What the container runs: compose hands `$$` over as `$`."""
    return [part.replace("$$", "$") for part in parts]


def local_options(options: list[str], port: int, db: Path) -> list[str]:
    local = {"address": "127.0.0.1", "port": str(port), "db": str(db)}
    local["state_save_interval"] = str(SAVE_INTERVAL_MS)
    out = []
    for option in options:
        name, value = option[2:].split("=", 1)
        out.append(f"--{name}={local.get(name, value)}")
    return out


def local_env(base: dict[str, str]) -> dict[str, str]:
    """The test's settings, and this venv's `celery` and `python` first on PATH."""
    return {**base, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


class ComposeFlower(Flower):
    """tests/flower_process.Flower, started by the compose file's own command."""

    def __init__(self, env: dict[str, str], log: Path, db: Path) -> None:
        super().__init__(env, log)
        self.env = local_env({**self.env, "FLOWER_BASIC_AUTH": f"{USER}:{self.password}"})
        command = container_argv(flower_service()["command"])
        self.argv = [*command[:4], *local_options(command[4:], self.port, db)]

    def command(self) -> list[str]:
        return self.argv

    def crash(self) -> None:
        """SIGKILL: no clean stop, so no save at exit; only the periodic saves count."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)
        self.proc = None
        self._log.close()

    def healthcheck(self) -> int:
        """The compose healthcheck's command, aimed at this Flower's port."""
        kind, *argv = container_argv(flower_service()["healthcheck"]["test"])
        assert kind == "CMD"
        argv = [a.replace("127.0.0.1:5555", f"127.0.0.1:{self.port}") for a in argv]
        return subprocess.run(argv, env=self.env, capture_output=True, timeout=30).returncode


def saved_tasks(db: Path) -> dict[str, str]:
    """Task ids in Flower's state file with their saved states (empty while it is missing or
    being replaced)."""
    try:
        with shelve.open(str(db), flag="r") as state:
            return {i: t.state for i, t in state["events"].tasks.items()}
    except Exception:  # not written yet, or caught between two renames
        return {}


@pytest.fixture
def flower_env(redis_server, tmp_path) -> dict[str, str]:
    return worker_env(redis_server.url, tmp_path / "flower-downloads")


def test_flower_keeps_the_task_history_across_a_crash(flower_env, worker, origin, client, tmp_path):
    db = tmp_path / "flower-data" / "flower.db"
    db.parent.mkdir()
    flower = ComposeFlower(flower_env, tmp_path / "flower.log", db).start()
    try:
        assert flower.healthcheck() == 0
        task = client.send_task(
            TASK, kwargs={"url": f"{origin.url}/bytes/1000"}, queue=worker.queue
        )
        assert task.get(timeout=60)["size"] == 1000
        flower.wait_state(task.id, "SUCCESS")
        # A save made before SUCCESS reached Flower holds the task as STARTED: wait for a later one.
        saved = lambda: saved_tasks(db).get(task.id) == "SUCCESS"  # noqa: E731
        wait_for(saved, 30, "the periodic save to hold the task's SUCCESS")
        flower.crash()
        assert flower.healthcheck() != 0
    finally:
        flower.stop()

    again = ComposeFlower(flower_env, tmp_path / "flower-again.log", db).start()
    try:
        listed = again.get("/api/tasks", taskname=TASK).json()
        assert listed[task.id]["state"] == "SUCCESS"
    finally:
        again.stop()


def test_flower_refuses_to_start_without_a_password(flower_env, tmp_path):
    command = container_argv(flower_service()["command"])
    env = local_env({**flower_env, "FLOWER_BASIC_AUTH": ""})  # compose's value while unset
    done = subprocess.run(
        [*command[:4], *local_options(command[4:], 1, tmp_path / "flower.db")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "flower: set FLOWER_BASIC_AUTH=user:password (in .env or the environment)"
    )
    assert not (tmp_path / "flower.db").exists()
