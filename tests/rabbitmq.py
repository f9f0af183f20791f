"""A private RabbitMQ node for the tests: its own node name, AMQP, distribution and epmd ports on
127.0.0.1, its own data, logs, config and cookie under a temporary directory. The machine's
/etc/rabbitmq files and any shared node are never read or touched."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

from tests.harness import free_port, wait_for

# The Debian package's start script; /usr/sbin/rabbitmq-server would `su` to the rabbitmq user
# and read /etc/rabbitmq.
SCRIPT = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
CTL = SCRIPT.with_name("rabbitmqctl")
# Above the tests' hard time limits; docs/production.md's rule for production is
# consumer_timeout >= DOWNLOAD_VISIBILITY_TIMEOUT.
CONSUMER_TIMEOUT_MS = 600_000


def installed() -> bool:
    return SCRIPT.exists() and shutil.which("erl") is not None


class RabbitServer:
    """One node; `kill` and `start` again keep its data (quorum queues and their messages)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port, self.dist_port, self.epmd_port = free_port(), free_port(), free_port()
        self.node = f"rabbit-test-{uuid.uuid4().hex[:8]}@localhost"
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_files()

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def _write_files(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        (self.workdir / "enabled_plugins").write_text("[].\n")  # no management listener
        (self.workdir / "rabbitmq-env.conf").write_text("")
        (self.workdir / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            f"consumer_timeout = {CONSUMER_TIMEOUT_MS}\n"
            "log.console = false\n"
        )

    def env(self) -> dict[str, str]:
        w = self.workdir
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin"),
            "HOME": str(w / "home"),  # its own Erlang cookie
            "RABBITMQ_CONF_ENV_FILE": str(w / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(w / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(w / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(w / "mnesia"),
            "RABBITMQ_LOG_BASE": str(w / "log"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_CRASH_DUMP": str(w / "erl_crash.dump"),  # not in the caller's directory
        }

    def start(self, timeout: float = 60) -> None:
        log = (self.workdir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [str(SCRIPT)],
            cwd=self.workdir,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the script runs the VM as its child: kill both at once
        )
        log.close()
        wait_for(self._answers, timeout, "rabbitmq-server to accept AMQP connections")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"rabbitmq-server exited:\n{self.log()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                s.sendall(b"AMQP\x00\x00\x09\x01")
                s.settimeout(2)
                return s.recv(1) == b"\x01"  # connection.start: the broker is booted
        except OSError:
            return False

    def log(self) -> str:
        return (self.workdir / "server.log").read_text(errors="replace")

    def stop(self) -> None:
        """A clean stop: the script passes SIGTERM on to the VM and waits for it."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(60)
            self.proc = None

    def kill(self) -> None:
        """A crash of the node: SIGKILL to the script and the VM, nothing flushed beyond what
        the node had synced."""
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
            wait_for(lambda: not self._listening(), 10, "the node's port to close")
            self.proc = None

    def _listening(self) -> bool:
        try:
            socket.create_connection(("127.0.0.1", self.port), 0.2).close()
            return True
        except OSError:
            return False

    def ctl(self, *args: str) -> str:
        """rabbitmqctl against this node, with its cookie; the output."""
        done = subprocess.run(
            [str(CTL), "-n", self.node, *args],
            cwd=self.workdir,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def close(self) -> None:
        """Kill the node (its data is thrown away) and the epmd it started on its own port."""
        self.kill()
        subprocess.run(
            ["epmd", "-kill"],
            env={**os.environ, "ERL_EPMD_PORT": str(self.epmd_port)},
            capture_output=True,
            timeout=10,
            check=False,
        )
