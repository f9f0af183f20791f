"""`make run`'s script: it refuses what it cannot run with, in one line and before starting
anything; once running it tells how to log in to Flower, keeps the password off command lines,
and stops everything it started on Ctrl-C (in a terminal, or through `| tee`) and on TERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from celery import Celery

from tests.flower_process import make_run_default
from tests.harness import ROOT, TASK, Worker, free_port, wait_for


def stack(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "scripts/stack.sh"],
        cwd=ROOT,
        env={**os.environ, "PY": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_bad_setting_is_one_line_and_starts_nothing():
    done = stack(DOWNLOAD_READ_TIMEOUT="abc")
    assert done.returncode == 2
    assert done.stderr.strip() == ("error: DOWNLOAD_READ_TIMEOUT='abc': expected a number")
    assert "flower:" not in done.stdout


def test_a_taken_flower_port_is_reported_before_starting():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = stack(FLOWER_PORT=str(port))
    assert done.returncode == 2
    assert f"127.0.0.1:{port} is taken" in done.stderr and "FLOWER_PORT=" in done.stderr


def test_a_broker_that_is_not_redis_without_a_result_backend_is_one_line():
    done = stack(CELERY_BROKER_URL="amqp://guest:hunter2@127.0.0.1:1//", CELERY_RESULT_BACKEND="")
    assert done.returncode == 2
    assert done.stderr.startswith("error: CELERY_RESULT_BACKEND is required")
    assert "hunter2" not in done.stderr and "flower:" not in done.stdout


class Output:
    """Everything a process prints, collected as it comes."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.proc = proc
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def close(self) -> None:
        self.reader.join(30)  # the end of the output: every process holding the pipe is gone
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def in_session(sid: int) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                found.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return found


def test_make_run_forgets_offline_workers_after_ten_seconds():
    assert make_run_default("FLOWER_PURGE_OFFLINE_WORKERS") == "10"


def test_make_run_logs_in_when_ready_keeps_the_password_off_ps_and_stops_on_ctrl_c(
    redis_server, tmp_path
):
    password = f"pw-{uuid.uuid4().hex}"
    port = free_port()
    broker, results = f"{redis_server.url}/5", f"{redis_server.url}/6"  # nobody else's queue
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DOWNLOAD_"))}
    env = {k: v for k, v in env.items() if not k.startswith("FLOWER_")}
    env.update(
        PY=sys.executable,
        CELERY_BROKER_URL=broker,
        CELERY_RESULT_BACKEND=results,
        FLOWER_PORT=str(port),
        FLOWER_BASIC_AUTH=f"ops:{password}",
        FLOWER_PURGE_OFFLINE_WORKERS="1",  # 10 s unless set, as docs/flower.md says
        WORKER_CONCURRENCY="2",
        DOWNLOAD_DIR=str(tmp_path / "downloads"),
    )
    proc = subprocess.Popen(
        ["bash", "scripts/stack.sh"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # a terminal's Ctrl-C reaches the whole group
    )
    out = Output(proc)
    try:
        wait_for(lambda: "Ctrl-C stops" in out.text(), 90, "the ready block")
        text = out.text()
        before, ready = text.split("\n  ready\n")
        assert f"  flower:    http://127.0.0.1:{port}/tasks\n" in ready
        assert "  user:      ops\n" in ready and f"  password:  {password}\n" in ready
        assert password not in before
        assert "Inspect method" not in text
        shown = [p.pid for p in psutil.process_iter() if password in " ".join(cmdline(p))]
        assert shown == [], "the password is on a command line (ps shows it)"

        # `make demo`'s worker: seen while it runs, gone from the list once it stopped.
        demo = Worker(
            {**env, "PYTHONPATH": str(ROOT)},
            f"demo-{uuid.uuid4().hex[:6]}",
            "demo",
            tmp_path / "demo.log",
            tmp_path / "downloads",
            ["-c", "1"],
        )
        demo.start(Celery(broker=broker))
        auth = ("ops", password)

        def listed() -> set[str]:
            page = requests.get(f"http://127.0.0.1:{port}/workers?json=1", auth=auth, timeout=5)
            return {w["hostname"] for w in page.json()["data"]}

        wait_for(lambda: demo.hostname in listed(), 30, "Flower to list the demo's worker")
        demo.stop()
        wait_for(lambda: demo.hostname not in listed(), 30, "the demo's worker to leave")
    finally:
        group = in_session(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(60)
        out.close()
    text = out.text()
    assert proc.returncode == 0, text[-3000:]
    assert text.rstrip().endswith("stopped") and "error:" not in text
    assert not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]


def cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def run_env(broker: str, results: str, tmp_path: Path) -> tuple[dict[str, str], int]:
    """The environment of a `make run` on its own broker databases and Flower port."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DOWNLOAD_"))}
    env = {k: v for k, v in env.items() if not k.startswith(("FLOWER_", "MAKE"))}
    env.update(
        PY=sys.executable,
        CELERY_BROKER_URL=broker,
        CELERY_RESULT_BACKEND=results,
        FLOWER_PORT=str(port),
        FLOWER_BASIC_AUTH=f"ops:pw-{uuid.uuid4().hex}",
        WORKER_CONCURRENCY="2",
        DOWNLOAD_DIR=str(tmp_path / "downloads"),
        STOP_GRACE="10",  # a warm shutdown's bound before KILL, shorter than make run's own
    )
    return env, port


def started_by(proc: subprocess.Popen[str], log: Path) -> list[psutil.Process]:
    """Once the ready block is in `log`: every process of the session `proc` leads (the
    components each have a process group of their own in it)."""
    wait_for(lambda: log.exists() and "Ctrl-C stops" in log.read_text(), 120, "the ready block")
    group = in_session(proc.pid)
    names = " ".join(" ".join(cmdline(p)) for p in group)
    assert "worker worker" in names and "flower" in names, names
    return group


def launch(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[str]:
    """`command` in a session of its own (as a terminal's job), its output in `log`."""
    with log.open("w") as out:
        return subprocess.Popen(
            command,
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def all_gone(group: list[psutil.Process], port: int) -> None:
    def gone() -> bool:
        return not [p for p in group if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(gone, 60, "every process `make run` started to exit")
    listen_on(port)  # Flower's port is free for the next `make run`


def listen_on(port: int) -> None:
    """Bind and listen as Flower and redis-server do (SO_REUSEADDR: a closed connection's
    TIME_WAIT does not hold the port), or fail because something still listens."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


@pytest.mark.timeout(300)
def test_make_run_through_tee_stops_everything_on_ctrl_c(origin, tmp_path):
    # No Redis answers at this broker: the script starts a private redis-server, stopped too.
    redis_port = free_port()
    broker = f"redis://127.0.0.1:{redis_port}"
    env, port = run_env(f"{broker}/0", f"{broker}/1", tmp_path)
    env.update(DOWNLOAD_ALLOW_PRIVATE="true", STOP_GRACE="5")
    log = tmp_path / "run.log"
    proc = subprocess.Popen(
        ["bash", "-c", 'make run 2>&1 | tee "$0"', str(log)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,  # its own session and process group, as a terminal's job
    )
    try:
        group = started_by(proc, log)
        assert "redis: starting a private redis-server" in log.read_text()
        assert any("redis-server" in " ".join(cmdline(p)) for p in group)
        # A download that would run for minutes: a worker's warm shutdown waits for it, so it
        # is the script that must stop the worker (KILL once STOP_GRACE has passed).
        app = Celery(broker=f"{broker}/0", backend=f"{broker}/1")
        slow = app.send_task(TASK, kwargs={"url": f"{origin.url}/bytes/50000000?rate=100000"})
        wait_for(lambda: slow.state == "PROGRESS", 60, "the slow download to run")
    finally:
        # A terminal's Ctrl-C: SIGINT to the foreground process group (bash, make, the script
        # and tee at once: tee is gone before the script says anything more).
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(120)  # generous: STOP_GRACE bounds it, a loaded machine stretches it
    all_gone(group, port)
    listen_on(redis_port)


@pytest.mark.timeout(480)
def test_term_to_the_script_or_to_make_stops_everything(redis_server, tmp_path):
    for n, command in enumerate((["bash", "scripts/stack.sh"], ["make", "run"])):
        env, port = run_env(
            f"{redis_server.url}/{5 + 2 * n}", f"{redis_server.url}/{6 + 2 * n}", tmp_path
        )
        log = tmp_path / f"run-{n}.log"
        proc = launch(command, env, log)
        try:
            group = started_by(proc, log)
        finally:
            proc.terminate()  # SIGTERM to that one process, as `kill PID` does
            proc.wait(120)  # generous: STOP_GRACE bounds it, a loaded machine stretches it
        all_gone(group, port)
        text = log.read_text()
        assert text.rstrip().endswith("stopped"), text[-3000:]


def test_a_component_that_dies_stops_the_rest(redis_server, tmp_path):
    env, port = run_env(f"{redis_server.url}/9", f"{redis_server.url}/10", tmp_path)
    log = tmp_path / "run.log"
    proc = launch(["bash", "scripts/stack.sh"], env, log)
    try:
        group = started_by(proc, log)
        [flower] = [p for p in group if "flower" in " ".join(cmdline(p))]
        flower.kill()  # Flower dies on its own: the stack stops the worker too and says why
        assert proc.wait(120) == 1
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(120)
    all_gone(group, port)
    text = log.read_text()
    assert "a component stopped on its own" in text and text.rstrip().endswith("stopped"), text
