"""A test-only task, loaded into a worker with `--include tests.probe`: it reports which process
runs it and which process made that process's session."""

from __future__ import annotations

import os
import threading
from typing import Any

from worker import lifecycle
from worker.celery_app import app


@app.task(name="tests.probe.session_info")
def session_info() -> dict[str, Any]:
    session = lifecycle.session()
    return {
        "pid": os.getpid(),
        "parent": os.getppid(),
        "session_made_in": lifecycle.session_created_in(),
        "session_id": id(session),
        "thread": threading.get_ident(),
    }
