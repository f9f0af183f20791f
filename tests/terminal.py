"""A command on a real pseudo-terminal that is its controlling terminal: Ctrl-C is a byte typed
into it (the line discipline turns it into SIGINT), and what rich draws is read back as a person
would see it."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import subprocess
import sys
import termios
import threading

from tests.harness import ROOT, wait_for

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class Terminal:
    """`python -m download_client.cli ARGS` on a fresh pseudo-terminal (stdin, stdout and
    stderr), in its own session with the terminal as its controlling one."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        primary, secondary = pty.openpty()
        self.fd = primary
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "download_client.cli", *args],
            cwd=ROOT,
            env={**env, "TERM": "xterm-256color", "COLUMNS": "160", "LINES": "40"},
            stdin=secondary,
            stdout=secondary,
            stderr=secondary,
            start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(secondary)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:  # the other side closed (Linux: EIO)
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def raw(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    @property
    def text(self) -> str:
        """What was written, without colours and cursor movements; each redraw on a line."""
        return ANSI.sub("", self.raw.replace("\r\n", "\n").replace("\r", "\n"))

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        match: re.Match[str] = wait_for(
            lambda: re.search(pattern, self.text), timeout, f"{pattern!r} on the terminal"
        )
        return match

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def finish(self, timeout: float = 60) -> int:
        code = self.proc.wait(timeout)
        self.reader.join(10)
        os.close(self.fd)
        return code
