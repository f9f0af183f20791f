"""Who downloads to a destination, fleet-wide: one claim per destination in Redis.

A claim names its holder (a task id) and the download's key (what changes the bytes: url, dest,
headers, sha256, max_bytes). It outlives one attempt, so a holder waiting between its own retries
keeps the destination; it expires on its own (the holder's hard time limit plus the longest retry
countdown) if the holder is lost. A finished holder leaves its result (under its task id) for a
while, and a task that waited for that holder with the same key takes it instead of downloading
again, whoever holds the destination by then.

The flock in `tasks.core.storage` stays the guarantee that one process writes a file at a time; the
claim is what lets everybody else wait without holding a worker process.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from download_client.arguments import DownloadRequest

# A finished holder's result stays this long for the tasks that waited on it; a waiter that comes
# later than that downloads (a conditional request: 304 when nothing changed).
DONE_TTL_S = 3600
_PREFIX = "downloads:claim:"

# KEYS: claim, this task's result meta, the result left by the holder waited for.
# ARGV: me, key, ttl ms. Returns nil when the claim is now mine, else a JSON object: who holds
# it, or what the holder waited for left.
_ACQUIRE = """
local meta = redis.call('GET', KEYS[2])
if meta and string.find(meta, '"status": "SUCCESS"', 1, true) then
  return cjson.encode({task=ARGV[1], self_done=true})
end
local left = redis.call('GET', KEYS[3])
if left and cjson.decode(left).key == ARGV[2] then return left end
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).task ~= ARGV[1] then return v end
redis.call('SET', KEYS[1], cjson.encode({task=ARGV[1], key=ARGV[2]}), 'PX', ARGV[3])
return false
"""
# KEYS: claim, where to leave the result. ARGV: me, result JSON or '' (none), its ttl ms.
_SETTLE = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).task == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


def flight_key(request: DownloadRequest) -> str:
    """What makes two downloads the same download: identical bytes for the same caller."""
    parts: list[Any] = [request.url, request.dest, sorted(request.headers.items())]
    parts += [request.sha256 or "", request.max_bytes or 0]
    return hashlib.sha256(json.dumps(parts).encode("utf-8", "surrogatepass")).hexdigest()


def claim_name(dest: str) -> str:
    return _PREFIX + hashlib.sha256(dest.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def left_name(task_id: str) -> str:
    return f"downloads:done:{task_id}"


@dataclass(frozen=True)
class Held:
    """Someone else's claim (`done` is None while it runs), or this task's own earlier success."""

    task: str
    done: dict[str, Any] | None = None
    self_done: bool = False


class Claims:
    """The claim of one destination for one task, kept in the result backend's Redis."""

    def __init__(self, client: Any, request: DownloadRequest, task_id: str, ttl_s: float):
        self.client, self.task_id, self.ttl_ms = client, task_id, int(ttl_s * 1000)
        self.name, self.key = claim_name(request.dest), flight_key(request)

    def acquire(self, waited_for: str | None) -> Held | None:
        """Take (or renew) the claim: None when it is ours now."""
        return self.acquired(self.acquire_on(self.client, waited_for))

    def acquire_on(self, pipe: Any, waited_for: str | None) -> Any:
        """Queue the taking on `pipe` (to share a round trip); `acquired` reads its answer."""
        keys = (self.name, f"celery-task-meta-{self.task_id}", left_name(waited_for or "-"))
        return pipe.eval(_ACQUIRE, 3, *keys, self.task_id, self.key, self.ttl_ms)

    @staticmethod
    def acquired(raw: Any) -> Held | None:
        if raw is None:
            return None
        seen = json.loads(raw)
        return Held(seen["task"], seen.get("done"), bool(seen.get("self_done")))

    def finish(self, result: dict[str, Any], pipe: Any = None) -> None:
        """Leave the result for those who waited, and the destination to whoever comes next
        (queued on `pipe` when given, to share a round trip)."""
        left = json.dumps({"task": self.task_id, "key": self.key, "done": result})
        self._settle(left, pipe)

    def release(self) -> None:
        self._settle("")

    def _settle(self, left: str, pipe: Any = None) -> None:
        keys = (self.name, left_name(self.task_id))
        (pipe or self.client).eval(_SETTLE, 2, *keys, self.task_id, left, DONE_TTL_S * 1000)
