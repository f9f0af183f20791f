"""A test-only task, loaded into a worker with `--include tests.probe`: it reports which process
runs it and which process made that process's session."""

from __future__ import annotations

import os
import threading
from typing import Any

from tasks import runtime
from worker import app


@app.task(name="tests.probe.session_info")
def session_info() -> dict[str, Any]:
    rt = runtime.current()
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "session_made_in": rt.pid,
        "session_id": id(rt.session),
        "thread": threading.get_ident(),
    }
