"""Per-origin concurrency and pauses, fleet-wide, in Redis (no Celery here).

Each origin (scheme, host, port) has:
- `downloads:origin:<o>:slots`, a sorted set of leases: member a task id, score the lease's end
  (Redis time, ms). A holder renews its lease from a thread; a holder that dies stops renewing
  and its slot comes back when the lease ends (LEASE_MS).
- `downloads:origin:<o>:paused`, set for Retry-After seconds when the origin answers 429 or 503:
  no slot is granted while it exists.
- `downloads:origin:<o>:parked`, a list of task messages, first come first served: a task that
  finds no slot parks its message here and leaves its worker process. Releasing a slot (or the
  sweep, once a pause or a lease ends) moves the head to `downloads:origin:<o>:waking`, reserves
  a slot for it, and the caller publishes it again; once it starts it leaves `waking`. An entry
  left in `waking` (its publisher died) is published again by the sweep.
Every step is one Lua script: the uncontended path is one round trip (take a slot), and it can
share that round trip with the task's other bookkeeping (`try_enter` on a pipeline). Leases are
renewed by one thread per process, whatever the number of downloads it runs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

LEASE_MS = 10_000
RENEW_S = 3.0
WAKING_STALE_MS = 30_000
PARKED_ORIGINS = "downloads:origins:parked"
STATS = "downloads:origins:stats"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or (443 if scheme == "https" else 80)
    return f"{scheme}://{(parts.hostname or '').lower()}:{port}"


def _keys(origin: str) -> list[str]:
    base = f"downloads:origin:{origin}"
    return [f"{base}:slots", f"{base}:paused", f"{base}:parked", f"{base}:waking", f"{base}:cap"]


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
"""
# Hand free slots to the parked, head first: each gets a lease and moves to `waking`.
_WAKE = """
local function wake(cap, lease)
  cap = tonumber(redis.call('GET', KEYS[5]) or cap)
  local woken = {}
  if redis.call('EXISTS', KEYS[2]) == 1 then return woken end
  while redis.call('LLEN', KEYS[3]) > 0 and (cap == 0 or redis.call('ZCARD', KEYS[1]) < cap) do
    local msg = redis.call('LPOP', KEYS[3])
    local id = cjson.decode(msg).id
    redis.call('ZADD', KEYS[1], now + lease, id)
    redis.call('HSET', KEYS[4], id, now .. '|' .. msg)
    woken[#woken + 1] = msg
  end
  if redis.call('LLEN', KEYS[3]) == 0 then redis.call('SREM', KEYS[6], ARGV[99]) end
  return woken
end
"""
# ARGV: id, cap, lease ms, message (parked if no slot; '' = only try), origin. Returns
# {status, pttl}: 1 granted, 0 parked (or not granted), -1 parked behind a pause (pttl: ms left).
_ACQUIRE = (
    _NOW
    + """
local id, cap, lease = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('SET', KEYS[5], cap)
redis.call('HDEL', KEYS[4], id)
if redis.call('ZSCORE', KEYS[1], id) then
  redis.call('ZADD', KEYS[1], now + lease, id)
  return {1, 0}
end
local paused = redis.call('PTTL', KEYS[2])
local full = cap > 0 and redis.call('ZCARD', KEYS[1]) >= cap
if paused <= 0 and not full and redis.call('LLEN', KEYS[3]) == 0 then
  redis.call('ZADD', KEYS[1], now + lease, id)
  return {1, 0}
end
if ARGV[4] == '' then return {0, 0} end
redis.call('RPUSH', KEYS[3], ARGV[4])
redis.call('SADD', KEYS[6], ARGV[5])
redis.call('HINCRBY', KEYS[7], 'deferrals ' .. ARGV[5], 1)
if paused > 0 then return {-1, paused} end
return {0, 0}
"""
)
_RENEW = (
    _NOW
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
  return 1
end
return 0
"""
)
# ARGV: id, cap, lease ms; ARGV[99] is the origin (for the parked set). Returns woken messages.
_RELEASE = (
    _NOW
    + _WAKE
    + """
redis.call('ZREM', KEYS[1], ARGV[1])
return wake(tonumber(ARGV[2]), tonumber(ARGV[3]))
"""
)
# The sweep: wake what a pause or an ended lease freed, and hand back stale `waking` entries.
_SWEEP = (
    _NOW
    + _WAKE
    + """
local out = wake(tonumber(ARGV[2]), tonumber(ARGV[3]))
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  local bar = string.find(all[i + 1], '|', 1, true)
  local at, msg = tonumber(string.sub(all[i + 1], 1, bar - 1)), string.sub(all[i + 1], bar + 1)
  if now - at > tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[4], all[i], now .. '|' .. msg)
    out[#out + 1] = msg
  end
end
return out
"""
)
_PAUSE = """
local left = redis.call('PTTL', KEYS[2])
if left < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[1])
  redis.call('HINCRBY', KEYS[7], 'pauses ' .. ARGV[2], 1)
end
return 1
"""


def _run(client: Any, script: str, origin: str, *argv: Any) -> Any:
    """Run a script on one origin's keys. EVAL with the text: Redis caches it by its SHA, and a
    pipeline needs no SCRIPT EXISTS round trip before it runs (as a registered Script would)."""
    args = [str(a) for a in argv]
    args += [""] * (98 - len(args)) + [origin]  # ARGV[99]: the origin, for the parked set
    keys = [*_keys(origin), PARKED_ORIGINS, STATS]
    return client.eval(script, len(keys), *keys, *args)


class _Renewer:
    """The one thread of a process that renews its leases every RENEW_S: a thread per download
    would cost a thread start for every small file."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: dict[tuple[str, str], Any] = {}  # (task id, origin) -> Redis client
        self.thread: threading.Thread | None = None

    def hold(self, client: Any, task_id: str, origin: str) -> None:
        with self.lock:
            self.leases[(task_id, origin)] = client
            if self.thread is None:
                self.thread = threading.Thread(target=self._loop, name="origin-leases", daemon=True)
                self.thread.start()

    def drop(self, task_id: str, origin: str) -> None:
        with self.lock:
            self.leases.pop((task_id, origin), None)

    def _loop(self) -> None:
        while True:
            time.sleep(RENEW_S)
            with self.lock:
                held = list(self.leases.items())
            for (task_id, origin), client in held:
                try:
                    _run(client, _RENEW, origin, task_id, LEASE_MS)
                except Exception:  # Redis away: the lease runs on; try again next time
                    continue

    def forked(self) -> None:
        """A forked child has none of its parent's threads or downloads."""
        self.lock, self.leases, self.thread = threading.Lock(), {}, None


_renewer = _Renewer()
os.register_at_fork(after_in_child=_renewer.forked)


class OriginBusy(Exception):
    """No slot at `origin` now: the task's message is parked and will be published again."""

    def __init__(self, origin: str, paused_ms: int) -> None:
        self.origin, self.paused_ms = origin, paused_ms
        why = f"paused for {paused_ms / 1000:.1f} s more" if paused_ms else "at its limit"
        super().__init__(f"{origin} is {why}; waiting for a slot there")


@dataclass
class Origins:
    """The fleet's origin slots for one task (one holder id)."""

    client: Any
    task_id: str
    cap_for: Callable[[str], int]
    parked_message: Callable[[], str]
    held: str | None = None
    woken: list[str] = field(default_factory=list)
    _trying: str | None = None

    def _run(self, script: str, origin: str, *argv: Any) -> Any:
        return _run(self.client, script, origin, *argv)

    def try_enter(self, url: str, pipe: Any) -> None:
        """Queue a try for a slot at `url`'s origin on `pipe`, parking nothing; `tried` reads
        the answer. A slot not had this way is asked for again by `enter`, which may park."""
        origin = origin_of(url)
        cap = self.cap_for(origin)
        if self.held is None and cap:
            self._trying = origin
            _run(pipe, _ACQUIRE, origin, self.task_id, cap, LEASE_MS, "", origin)

    def tried(self, answers: list[Any]) -> list[Any]:
        """Take the try's answer off the end of the pipeline's `answers`; return the rest."""
        if self._trying is None:
            return answers
        origin, self._trying = self._trying, None
        if int(answers[-1][0]) == 1:
            self._hold(origin)
        return answers[:-1]

    def enter(self, url: str) -> None:
        """Hold a slot at `url`'s origin (releasing one held elsewhere), or park and raise."""
        origin = origin_of(url)
        if origin == self.held:
            return
        self.leave()
        cap = self.cap_for(origin)
        if cap == 0:
            return
        status, left = self._run(
            _ACQUIRE, origin, self.task_id, cap, LEASE_MS, self.parked_message(), origin
        )
        if int(status) != 1:
            raise OriginBusy(origin, int(left))
        self._hold(origin)

    def _hold(self, origin: str) -> None:
        self.held = origin
        _renewer.hold(self.client, self.task_id, origin)

    def leave(self, pipe: Any = None) -> bool:
        """Give the slot back; the messages it wakes are collected in `woken` (with `pipe`, the
        release is queued there and `took_back` reads its answer after the pipe ran)."""
        if self.held is None:
            return False
        origin, self.held = self.held, None
        _renewer.drop(self.task_id, origin)
        woken = _run(
            pipe or self.client, _RELEASE, origin, self.task_id, self.cap_for(origin), LEASE_MS
        )
        if pipe is None:
            self.woken += woken
        return True

    def took_back(self, answer: list[Any]) -> None:
        self.woken += [m.decode() if isinstance(m, bytes) else m for m in answer]

    def pause_held(self, seconds: float) -> None:
        """The held origin asked to slow down (429 or 503 with Retry-After): nobody in the fleet
        is granted a slot there for `seconds`."""
        if self.held is not None and seconds > 0:
            self._run(_PAUSE, self.held, int(seconds * 1000), self.held)


def sweep(client: Any, cap_for: Callable[[str], int]) -> list[str]:
    """Messages to publish again: woken by a pause or a lease that ended, or stuck in `waking`."""
    out: list[str] = []
    for raw in client.smembers(PARKED_ORIGINS) | _waking_origins(client):
        origin = raw.decode() if isinstance(raw, bytes) else raw
        out += _run(client, _SWEEP, origin, "", cap_for(origin), LEASE_MS, WAKING_STALE_MS)
    return [m.decode() if isinstance(m, bytes) else m for m in out]


def _waking_origins(client: Any) -> set[str]:
    return {
        k.decode().removeprefix("downloads:origin:").removesuffix(":waking")
        for k in client.scan_iter(match="downloads:origin:*:waking", count=100)
    }


def stats(client: Any) -> dict[str, Any]:
    """In flight per origin (live leases), deferrals and pauses so far."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    flight = {}
    for key in client.scan_iter(match="downloads:origin:*:slots", count=100):
        origin = key.decode().removeprefix("downloads:origin:").removesuffix(":slots")
        flight[origin] = client.zcount(key, now_ms, "+inf")  # live leases only
    counts = {k.decode(): int(v) for k, v in client.hgetall(STATS).items()}
    for name in counts:  # an origin seen before and idle now shows 0, not nothing
        flight.setdefault(name.split(" ", 1)[1], 0)
    return {"in_flight": flight, "counts": counts}
