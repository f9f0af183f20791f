"""Loaded into a test worker with `--include tests.roundtrips`: counts the Redis round trips each
worker process makes (one per command or pipeline sent) and writes them to
$ROUNDTRIPS_DIR/<pid> when the process ends."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis.connection
from celery.signals import worker_process_shutdown

_sent = [0]
_send = redis.connection.AbstractConnection.send_packed_command


def _counting(self: Any, command: Any, check_health: bool = True) -> None:
    _sent[0] += 1
    _send(self, command, check_health)


redis.connection.AbstractConnection.send_packed_command = _counting  # type: ignore[method-assign]
os.register_at_fork(after_in_child=lambda: _sent.__setitem__(0, 0))


@worker_process_shutdown.connect(weak=False)
def _write(**_: Any) -> None:
    Path(os.environ["ROUNDTRIPS_DIR"], str(os.getpid())).write_text(str(_sent[0]))
