"""A deliberately leaking task, loaded only into a benchmark worker with `--include bench.leaky`:
`bench.leaky` downloads like `downloads.fetch` (the same task path) and then keeps LEAK_BYTES per
download in a module-level list (a cache that never evicts), to show what recycling bounds."""

from __future__ import annotations

import os
from typing import Any

from download_client.contract import DownloadResult
from tasks.fetch import FetchTask
from worker import app

LEAK_BYTES = 64 * 1024
_KEPT: list[bytes] = []


class Leaky(FetchTask):
    name = "bench.leaky"

    def run(self, *args: Any, **kwargs: Any) -> DownloadResult:
        result = super().run(*args, **kwargs)
        _KEPT.append(os.urandom(LEAK_BYTES))  # random bytes: every page is really touched
        return result


app.register_task(Leaky())
