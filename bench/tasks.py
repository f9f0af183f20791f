"""Bench-only tasks, loaded into a benchmark worker with `--include bench.tasks`; never part of the
production app. Each is the real `downloads.fetch` task path with one named difference, so that
only that difference is measured.

  bench.session_per_download  the anti-pattern: a new requests.Session for every download
  bench.noop                  Celery's own ceiling: same configuration, same arguments, no work
  bench.noop_as_long          the no-op holding its child as long as a download does (`hold_s`,
                              asleep: no CPU), so the main process sees the same pace of tasks
"""

from __future__ import annotations

import time
from typing import Any

import requests

from tasks.core.http import new_session
from tasks.fetch import FetchTask
from tasks.runtime import Runtime
from worker import app


class SessionPerDownload(FetchTask):
    name = "bench.session_per_download"

    def session(self, rt: Runtime) -> requests.Session:
        # The mistake as it is usually made: a fresh Session, dropped (not closed) when done.
        return new_session(rt.settings.allow_private)


@app.task(name="bench.noop", typing=False)
def noop(**kwargs: Any) -> dict[str, Any]:
    """Returns its arguments, so the stored result is about the size of a download's."""
    return dict(kwargs)


@app.task(name="bench.noop_as_long", typing=False)
def noop_as_long(hold_s: float = 0.0, **kwargs: Any) -> dict[str, Any]:
    """The no-op, returning after `hold_s` seconds asleep."""
    time.sleep(hold_s)
    return dict(kwargs)


app.register_task(SessionPerDownload())
