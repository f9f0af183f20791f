from __future__ import annotations

from pathlib import Path

from tests.conftest import run
from tests.server import body_sha256


def test_small_download(client, worker, origin, dest):
    result = run(client, worker, url=f"{origin.url}/bytes/100000", dest=dest)
    assert result["sha256"] == body_sha256(100000)
    assert (Path(worker.download_dir) / dest).stat().st_size == 100000
