"""A real `celery -A worker flower` process for the tests: a free port on 127.0.0.1, basic auth
and the task list's columns as `make run` sets them, and helpers for its REST API and its
Prometheus text."""

from __future__ import annotations

import re
import secrets
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any, Self

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import ROOT, free_port, wait_for

USER = "ops"

# Flower answers HTTP on the one thread that also takes in the event stream: on a loaded
# 2-core machine, after a whole suite's events, one answer has taken over 10 s.
ANSWER_S = 30


def make_run_default(var: str) -> str:
    """The value scripts/stack.sh (`make run`) gives a FLOWER_* variable left unset."""
    script = (ROOT / "scripts" / "stack.sh").read_text()
    found = re.search(rf"^export {var}=\$\{{{var}:-(?P<value>[^}}]*)\}}$", script, re.M)
    assert found, f"scripts/stack.sh sets no default for {var}"
    return found["value"]


class Flower:
    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)
        self.env = {k: v for k, v in env.items() if not k.startswith("FLOWER_")}
        # As `make run` starts it: options from the environment, none secret on the command line.
        self.env.update(
            FLOWER_BASIC_AUTH=f"{USER}:{self.password}",
            FLOWER_TASKS_COLUMNS=make_run_default("FLOWER_TASKS_COLUMNS"),
        )
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth(self) -> tuple[str, str]:
        return (USER, self.password)

    def command(self) -> list[str]:
        return [
            *(sys.executable, "-m", "celery", "-A", "worker", "flower"),
            *("--address=127.0.0.1", f"--port={self.port}", "--logging=info"),
        ]

    def start(self) -> Self:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(),
            cwd=ROOT,
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_for(self._healthy, 60, "flower to answer /healthcheck")
        wait_for(self._sees_events, 60, "flower to receive events")
        return self

    def _healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"flower exited early:\n{self.log()}")
        try:
            return requests.get(f"{self.url}/healthcheck", timeout=2).status_code == 200
        except requests.ConnectionError:
            return False

    def _sees_events(self) -> bool:
        """Events sent before Flower's receiver connects are lost: send a task-sent (Flower
        publishes one for what it submits) for a task nobody runs until Flower knows it."""
        probe = self.post(
            "/api/task/send-task/flower.probe", {"queue": f"flower-probe-{uuid.uuid4().hex[:6]}"}
        )
        probe.raise_for_status()
        tid = probe.json()["task-id"]
        try:
            wait_for(lambda: self.get(f"/api/task/info/{tid}").status_code == 200, 2, "probe")
        except AssertionError:
            return False
        return True

    def get(self, path: str, auth: Any = "default", **params: Any) -> requests.Response:
        return requests.get(
            f"{self.url}{path}",
            params=params,
            auth=self.auth if auth == "default" else auth,
            timeout=ANSWER_S,
        )

    def post(self, path: str, body: Any = None, auth: Any = "default") -> requests.Response:
        return requests.post(
            f"{self.url}{path}",
            json=body,
            auth=self.auth if auth == "default" else auth,
            timeout=ANSWER_S,
        )

    def info(self, task_id: str) -> dict[str, Any] | None:
        r = self.get(f"/api/task/info/{task_id}")
        return r.json() if r.status_code == 200 else None  # type: ignore[no-any-return]

    def wait_state(self, task_id: str, *states: str, timeout: float = 60) -> dict[str, Any]:
        """Flower's event view of a task, once it is in one of `states`."""

        def check() -> dict[str, Any] | None:
            info = self.info(task_id)
            return info if info is not None and info["state"] in states else None

        return wait_for(check, timeout, f"flower to show {task_id} in {states}")  # type: ignore[no-any-return]

    def wait_result(self, task_id: str, timeout: float = 60) -> dict[str, Any]:
        """Poll /api/task/result/<id> (without ?timeout=: see celery-facts) until it is done."""

        def check() -> dict[str, Any] | None:
            body = self.get(f"/api/task/result/{task_id}").json()
            return body if body["state"] in ("SUCCESS", "FAILURE", "REVOKED") else None

        return wait_for(check, timeout, f"the result of {task_id}")  # type: ignore[no-any-return]

    def queue_lengths(self) -> dict[str, int]:
        self.get("/api/workers", refresh=1)  # Flower lists the queues its known workers consume
        body = self.get("/api/queues/length").json()
        return {q["name"]: q["messages"] for q in body["active_queues"]}

    def metric(self, name: str, **labels: str) -> float | None:
        """The sum of the samples of `name` whose labels include `labels` (None: no sample)."""
        text = requests.get(f"{self.url}/metrics", timeout=ANSWER_S).text
        found = [
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        return sum(found) if found else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
        self._log.close()
