"""Submitter groups: the services that share a fleet get turns at its workers.

A download of group `g` (the `group` argument) is sent to its queue's group queue,
`<queue>.group-<g>`; the default group's is the queue itself. Workers consume every group queue
of the queues they serve, taking from them in turn as from the lanes (download_client/lanes.py),
so a group with a backlog does not hold another group's downloads behind it. A group's queue is
made known once, in Redis (`downloads:group-queues`, the set of group queues ever used) and by a
broadcast that tells running workers to consume it (worker/groups.py)."""

from __future__ import annotations

import re
from typing import Any

from download_client.errors import PermanentError

DEFAULT_GROUP = "default"
KNOWN_GROUPS = "downloads:group-queues"
CONSUME_COMMAND = "downloads_consume_group"
GROUP_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,39}")
_INFIX = ".group-"


def check_group(value: Any) -> str:
    """The group named by the `group` argument (None: the default), or PermanentError."""
    if value is None:
        return DEFAULT_GROUP
    if not isinstance(value, str):
        raise PermanentError(f"group: expected a string, got {type(value).__name__}")
    if not GROUP_NAME.fullmatch(value):
        raise PermanentError(
            f"group: {value[:60]!r} is not a group name (1-40 of a-z, 0-9, '_' and '-', "
            "starting with a letter or digit)"
        )
    return value


def group_queue(queue: str, group: str) -> str:
    """Where a download of `group` is sent when submitted to `queue`."""
    return queue if group == DEFAULT_GROUP else f"{queue}{_INFIX}{group}"


def split_group(name: str) -> tuple[str, str]:
    """(queue, group) of a queue's name: the queue it is a group queue of, or itself."""
    queue, infix, group = name.rpartition(_INFIX)
    if infix and queue and GROUP_NAME.fullmatch(group):
        return queue, group
    return name, DEFAULT_GROUP


def is_group_queue(name: str) -> bool:
    return split_group(name)[1] != DEFAULT_GROUP
