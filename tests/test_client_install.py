"""The contract package as another service meets it: installed from this project (not imported
from the checkout), used by a service whose own code has a `tasks` module, the usual Celery
layout. It must submit, wait and read the result without ever importing our `tasks` or `worker`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.harness import ROOT

SERVICE = """
import json, os, sys
import tasks  # the service's own module, not ours
from download_client import RESULT_KEYS, connect, submit, wait

assert tasks.MINE, "the service's tasks module was shadowed"
app = connect()
result = submit(app, sys.argv[1], dest=sys.argv[2], queue="celery")
wait([result], timeout=60)
theirs = [m for m in sys.modules if m == "worker" or m.startswith(("worker.", "tasks."))]
print(json.dumps({"state": result.state, "result": result.result, "keys": list(RESULT_KEYS),
                  "ours_imported": theirs}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(ROOT),
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )
    return site


def test_a_service_with_its_own_tasks_module_uses_the_installed_client(
    installed, tmp_path, redis_server, worker, origin
):
    service = tmp_path / "service"
    service.mkdir()
    (service / "tasks.py").write_text("MINE = True\n")
    (service / "service.py").write_text(textwrap.dedent(SERVICE))
    env = {
        "PATH": "/usr/bin:/bin",
        # The service's directory first (as `python service.py` does), then the install.
        "PYTHONPATH": f"{service}:{installed}",
        "CELERY_BROKER_URL": f"{redis_server.url}/0",
        "CELERY_RESULT_BACKEND": f"{redis_server.url}/1",
    }
    url = f"{origin.url}/bytes/4096?seed=svc"
    done = subprocess.run(
        [sys.executable, "-B", "service.py", url, "svc/a.bin"],
        cwd=service,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["state"] == "SUCCESS" and seen["result"]["size"] == 4096
    assert sorted(seen["result"]) == sorted(seen["keys"])
    assert seen["ours_imported"] == []
    assert (Path(worker.download_dir) / "svc/a.bin").stat().st_size == 4096
