"""The per-process resources a download uses: the settings, one requests.Session, the limits and
the download root, read through one accessor, `current()`.

The session is made after fork, in the process (or thread) that uses it, never before: children
would share its sockets and TLS state (requests#4323, urllib3#850). A prefork child opens its
runtime in `worker_process_init` and closes it in `worker_process_shutdown` (worker/lifecycle.py);
a pool without children (threads, solo) gets one per thread on first use.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import requests

from download_client.settings import Settings
from tasks.core.egress import Egress
from tasks.core.http import new_session
from tasks.core.transfer import Limits


@dataclass
class Runtime:
    settings: Settings
    session: requests.Session
    limits: Limits
    root: Path
    pid: int = field(default_factory=os.getpid)  # the process that made the session

    @classmethod
    def open(cls, settings: Settings) -> Runtime:
        s = settings
        limits = Limits(s.connect_timeout, s.read_timeout, s.max_bytes, s.chunk_size,
                        s.result_expires, s.segments, s.segment_min, s.segment_below)  # fmt: skip
        # A segmented download keeps one connection per segment open at its origin.
        session = new_session(s.allow_private, max(4, s.segments), Egress.from_settings(s))
        return cls(s, session, limits, s.download_dir)

    def close(self) -> None:
        self.session.close()


_configured: dict[str, Settings] = {}
_process: dict[str, Runtime] = {}
_threads = threading.local()


def configure(settings: Settings) -> None:
    """The settings runtimes are made from (the app does this once, when it is created)."""
    _configured["settings"] = settings


def configured() -> Settings:
    """The settings the app was built with, in any process (no runtime needed)."""
    return _configured["settings"]


def open_for_process() -> Runtime:
    """Called right after fork: this process's runtime, made here."""
    close_for_process()
    _process["runtime"] = Runtime.open(_configured["settings"])
    return _process["runtime"]


def close_for_process() -> None:
    runtime = _process.pop("runtime", None)
    if runtime is not None and runtime.pid == os.getpid():
        runtime.close()


def current() -> Runtime:
    """The runtime of the calling process, or of the calling thread in a pool without children."""
    own = _process.get("runtime")
    if own is not None and own.pid == os.getpid():
        return own
    mine: Runtime | None = getattr(_threads, "runtime", None)
    if mine is None or mine.pid != os.getpid():
        mine = _threads.runtime = Runtime.open(_configured["settings"])
    return mine
