"""A producer that knows nothing of this project: a bare Celery app, JSON only, submitting
`downloads.fetch` by name, as the README's "Submitting from another service" shows. Run as a
script in a clean environment; prints one JSON line: the id, the states it saw, the result.

Usage: python bare_producer.py BROKER BACKEND QUEUE KWARGS_JSON [TIMEOUT]"""

from __future__ import annotations

import json
import sys
import time

from celery import Celery


def main() -> None:
    broker, backend, queue, kwargs = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    timeout = float(sys.argv[5]) if len(sys.argv) > 5 else 30.0
    app = Celery(broker=broker, backend=backend)
    app.conf.accept_content = ["json"]
    result = app.send_task("downloads.fetch", kwargs=kwargs, queue=queue)
    states, progress = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        meta = result.backend.get_task_meta(result.id)
        if not states or states[-1] != meta["status"]:
            states.append(meta["status"])
        if meta["status"] == "PROGRESS":
            progress.append(meta["result"])
        if meta["status"] in ("SUCCESS", "FAILURE", "REVOKED"):
            break
        time.sleep(0.02)
    value = result.result
    shown = value if isinstance(value, dict) else f"{type(value).__name__}: {value}"
    imported = sorted(
        m for m in sys.modules if m.split(".")[0] in ("download_client", "tasks", "worker")
    )
    print(
        json.dumps(
            {
                "id": result.id,
                "states": states,
                "progress": progress,
                "result": shown,
                "project_modules": imported,
            }
        )
    )


if __name__ == "__main__":
    main()
