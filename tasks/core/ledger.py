"""The ledger: every Redis key the workers keep for a download, and every round trip they make
with them, in one place (no Celery here).

The keys live in the result backend's Redis, beside Celery's results:

    downloads:claim:<hash of dest>        who downloads to a destination (tasks/core/claims.py)
    downloads:done:<task id>              a finished holder's result, for those who waited on it
    downloads:deliveries:<id>:<retries>   deliveries of one message (the poison guard)
    downloads:attempts:<id>               runs of one download (its result's `attempts`)
    downloads:retry:<id>                  why a download is in RETRY, and when it is due
    downloads:deadline:<id>               a download's deadline, fixed when it is first admitted
    downloads:callback-given-up:<id>      a callback the workers gave up on
    downloads:metrics:bytes, :recycled    the fleet's running totals (worker/metrics.py)
    downloads:<kind>:<scope>:...          a fleet-wide budget (tasks/core/budgets.py): `slots`
                                          (leases), `paused`, `parked`, `waking`, `cap`,
                                          `urgent` (parked urgent messages), `turn`,
                                          `parked-<group>` (a submitter group's parked
                                          messages; `parked` is the default group's),
                                          `groups` (those with any), `vtime` (their slot
                                          time), `held` (the slots' holders), `amounts`
                                          (what each lease counts, where not 1: a disk
                                          reservation's bytes); for the origin slots,
                                          downloads:origin:<origin>:slots
    downloads:<kind>s:parked              the scopes of a budget with parked messages
    downloads:<kind>s:waking              the scopes of a budget with woken messages not yet
                                          taken up (so the sweep never scans the keyspace)
    downloads:<kind>s:due                 messages parked until a time (a sorted set by it)
    downloads:<kind>s:stats               deferrals and pauses per scope
    downloads:rate:<scope>                a bandwidth budget's next free time, in microseconds
                                          (tasks/core/bandwidth.py): an origin, or
                                          `worker <hostname>`
    downloads:rates:stats                 per bandwidth scope: its rate, the bytes it let
                                          through and when it was last used
    downloads:disks:volumes               per volume of the disk reservations: its free
                                          space and margin as a worker last measured them

A download's round trips are typed calls: `admit` (claim, delivery count, STARTED, a budget
slot) returns an `Admitted`, `settle` (final state, claim, slot, bytes, uncounting) a `Settled`.
Each records where its commands land on the pipeline when it queues them and reads its own
answers back by those names: no caller counts positions. The scripts decode JSON (cjson), and
Celery's result keys are given by the backend (`get_key_for_task`), never spelled here."""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from download_client.records import RATE_PREFIX, RATES_STATS

PREFIX = "downloads:"
BYTES = f"{PREFIX}metrics:bytes"
RECYCLED = f"{PREFIX}metrics:recycled"
# A finished holder's result stays this long for the tasks that waited on it; a waiter that
# comes later downloads (a conditional request: 304 when nothing changed).
DONE_TTL_S = 3600


def claim_key(dest: str) -> str:
    return (
        f"{PREFIX}claim:" + hashlib.sha256(dest.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    )


def done_key(task_id: str) -> str:
    return f"{PREFIX}done:{task_id}"


def deliveries_key(task_id: str, retries: int) -> str:
    return f"{PREFIX}deliveries:{task_id}:{retries}"


def attempts_key(task_id: str) -> str:
    return f"{PREFIX}attempts:{task_id}"


def retry_note_key(task_id: str) -> str:
    """Where a download in RETRY keeps why and until when (docs/contract.md); the client reads
    it under the same name (download_client/records.py)."""
    return f"{PREFIX}retry:{task_id}"


def deadline_key(task_id: str) -> str:
    return f"{PREFIX}deadline:{task_id}"


def given_up_key(task_id: str) -> str:
    return f"{PREFIX}callback-given-up:{task_id}"


@dataclass(frozen=True)
class BudgetKeys:
    """The keys of one scope of one budget (an origin of the per-origin slots)."""

    kind: str
    scope: str

    @property
    def parked_scopes(self) -> str:
        return f"{PREFIX}{self.kind}s:parked"

    @property
    def waking_scopes(self) -> str:
        return f"{PREFIX}{self.kind}s:waking"

    @property
    def stats(self) -> str:
        return f"{PREFIX}{self.kind}s:stats"

    @property
    def due(self) -> str:
        return f"{PREFIX}{self.kind}s:due"

    @property
    def names(self) -> list[str]:
        """The scripts' KEYS, in their order."""
        base = f"{PREFIX}{self.kind}:{self.scope}"
        scope = [f"{base}:{part}" for part in ("slots", "paused", "parked", "waking", "cap")]
        turns = [f"{base}:{part}" for part in ("urgent", "turn")]
        shares = [f"{base}:{part}" for part in ("groups", "vtime", "held")]
        return [*scope, self.parked_scopes, self.stats, self.waking_scopes, *turns, *shares,
                f"{base}:amounts"]  # fmt: skip


def _scopes(client: Any, kind: str, suffix: str) -> dict[str, str]:
    """Scope -> key, for the keys of one budget that end in `suffix` (a SCAN of the keyspace:
    only for entries written by workers older than the `waking` index)."""
    head, tail = f"{PREFIX}{kind}:", f":{suffix}"
    found = {}
    for raw in client.scan_iter(match=f"{head}*{tail}", count=100):
        key = raw.decode() if isinstance(raw, bytes) else raw
        found[key.removeprefix(head).removesuffix(tail)] = key
    return found


# --- scripts -------------------------------------------------------------------------------

# KEYS: claim, this task's result (Celery's key), the result left by the holder waited for.
# ARGV: me, flight key, ttl ms. Returns nil when the claim is now mine, else a JSON object: who
# holds it, what the holder waited for left, or this task's own stored end (SUCCESS, FAILURE or
# REVOKED: final, never replaced by a run, _STORE).
_CLAIM = """
local meta = redis.call('GET', KEYS[2])
if meta then
  local ok, stored = pcall(cjson.decode, meta)
  local was = ok and type(stored) == 'table' and stored['status']
  if was == 'SUCCESS' or was == 'FAILURE' or was == 'REVOKED' then
    return cjson.encode({task=ARGV[1], self_done=true})
  end
end
local left = redis.call('GET', KEYS[3])
if left and cjson.decode(left).key == ARGV[2] then return left end
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).task ~= ARGV[1] then return v end
redis.call('SET', KEYS[1], cjson.encode({task=ARGV[1], key=ARGV[2]}), 'PX', ARGV[3])
return false
"""
# KEYS: claim, where to leave the result. ARGV: me, result JSON or '' (none), its ttl ms.
_UNCLAIM = """
if ARGV[2] ~= '' then redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3]) end
local v = redis.call('GET', KEYS[1])
if v and cjson.decode(v).task == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""
# Celery's read-then-write as one script, which never undoes an end: a stored SUCCESS is never
# overwritten (a lost worker's late copy must not undo a finished task), and a stored FAILURE or
# REVOKED only by another final state (a run's RETRY can reach Redis after the run that its
# re-sent message started has failed: Celery sends a retry before it stores RETRY, and that
# store may wait out a Redis outage). KEYS: the task's result key. ARGV: the encoded meta
# (JSON), its expiry in seconds (0: none). Returns 1 when stored.
# The write both state scripts end with: the value, its expiry (0: none), and the message
# result consumers subscribed to the key wait for.
_WRITE_STATE = """
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""
_STORE = (
    """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, meta = pcall(cjson.decode, cur)
  local was = ok and type(meta) == 'table' and meta['status']
  if was == 'SUCCESS' then return 0 end
  if was == 'FAILURE' or was == 'REVOKED' then
    local now = cjson.decode(ARGV[1])['status']
    if now ~= 'SUCCESS' and now ~= 'FAILURE' and now ~= 'REVOKED' then return 0 end
  end
end
"""
    + _WRITE_STATE
)
# Same as _STORE, but only where no state exists yet (a refused message's FAILURE).
_STORE_NEW = "\nif redis.call('EXISTS', KEYS[1]) == 1 then return 0 end" + _WRITE_STATE

# Budgets. KEYS: BudgetKeys.names. ARGV[1] the scope, ARGV[2] its capacity (0: none), ARGV[3]
# the lease in ms; each script's own arguments follow. A lease is a member of `slots` scored by
# its end (Redis time, ms): a holder's token (one per run), or `woken:<task id>`, the slot
# reserved for a parked message that was woken and is being published again.
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local scope, lease = ARGV[1], tonumber(ARGV[3])
local cap = tonumber(redis.call('GET', KEYS[5]) or ARGV[2])
"""
# Fair shares between submitter groups (download_client/groups.py), by slot time: each group has
# a virtual time (`vtime`, KEYS[12]), the slot time its downloads held here divided by its
# weight. A slot freed goes to the parked group with the least (`groups`, KEYS[11], a sorted set
# of the groups with parked messages, scored by it); a group that had nothing parked joins at
# the time of the last one served (`_clock`), so it neither lags behind nor banks credit. A
# download is charged its group's mean slot time (`avg:<group>`) when its slot is reserved,
# and the difference once it is released (`held`, KEYS[13]); so several slots freed at once do
# not all go to one group. A woken download's slot time runs from its wake-up: the slot was
# kept for it from then on.
_GROUPS = """
local function list_of(g)  -- `parked-<group>`: no group name can look like another key's suffix
  if g == 'default' then return KEYS[3] end
  return KEYS[3] .. '-' .. g
end
local function vtime(g) return tonumber(redis.call('HGET', KEYS[12], g) or '0') end
local function charge(g, amount)
  local v = vtime(g) + amount
  redis.call('HSET', KEYS[12], g, v)
  redis.call('PEXPIRE', KEYS[12], 604800000)  -- a scope idle for a week starts afresh
  if redis.call('ZSCORE', KEYS[11], g) then redis.call('ZADD', KEYS[11], v, g) end
  return amount
end
local function estimate(g, weight)
  return tonumber(redis.call('HGET', KEYS[12], 'avg:' .. g) or '1000') / weight
end
local function joins(g)
  if redis.call('ZSCORE', KEYS[11], g) then return end
  local v = math.max(vtime(g), tonumber(redis.call('HGET', KEYS[12], '_clock') or '0'))
  redis.call('HSET', KEYS[12], g, v)
  redis.call('ZADD', KEYS[11], v, g)
end
local function hold(holder, g, weight, pre, since)
  if not pre then pre = charge(g, estimate(g, weight)) end
  redis.call('HSET', KEYS[13], holder, cjson.encode({at=since or now, g=g, w=weight, pre=pre}))
  redis.call('PEXPIRE', KEYS[13], 86400000)
end
local function settle_held(holder, lost)
  local raw = redis.call('HGET', KEYS[13], holder)
  if not raw then return end
  redis.call('HDEL', KEYS[13], holder)
  -- A holder whose lease ended (it died) keeps the estimate it was charged: when it died is
  -- not known, and the sweep may find it long after.
  if lost then return end
  local e = cjson.decode(raw)
  local ms = math.max(0, now - e.at)
  local avg = tonumber(redis.call('HGET', KEYS[12], 'avg:' .. e.g) or ms)
  redis.call('HSET', KEYS[12], 'avg:' .. e.g, avg * 0.8 + ms * 0.2)
  charge(e.g, ms / e.w - e.pre)
end
"""
# Weighted leases: a lease counts its holder's entry in `amounts` (KEYS[14]), 1 without one, and
# a parked message its `need`, 1 without one. Only a budget whose scopes count more than one
# thing a lease (the disk reservations' bytes, tasks/core/disk.py) writes `amounts`: without it
# the sum is the number of leases, as the per-origin slots count.
_AMOUNTS = """
local function used()
  if redis.call('EXISTS', KEYS[14]) == 0 then return redis.call('ZCARD', KEYS[1]) end
  local n = 0
  for _, h in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
    n = n + tonumber(redis.call('HGET', KEYS[14], h) or '1')
  end
  return n
end
local function set_amount(h, n)
  if n == 1 then redis.call('HDEL', KEYS[14], h) else redis.call('HSET', KEYS[14], h, n) end
end
local function need(msg)
  if not msg or not string.find(msg, '"need"', 1, true) then return 1 end
  local ok, m = pcall(cjson.decode, msg)
  return (ok and type(m) == 'table' and tonumber(m.need)) or 1
end
"""
# Hand free slots to the parked: each gets a reserved lease and moves to `waking`. Urgent
# messages wait in a list of their own (KEYS[9]) and take turns with the others: after an
# urgent one (`turn`, KEYS[10]) an ordinary one is woken if any waits, so neither kind stops
# the other. Ordinary ones wait in their group's list and are woken by the groups' shares. One
# whose need does not fit in the room left is not woken, nor is any behind it: the large are
# not overtaken for ever by the small.
_PARKED = """
local function parked()
  return redis.call('LLEN', KEYS[3]) + redis.call('LLEN', KEYS[9]) + redis.call('ZCARD', KEYS[11])
end
"""
_WAKE = (
    _PARKED
    + _GROUPS
    + _AMOUNTS
    + """
local function ordinary(room)
  if redis.call('LLEN', KEYS[3]) > 0 then joins('default') end  -- parked by an older worker
  while true do
    local first = redis.call('ZRANGE', KEYS[11], 0, 0, 'WITHSCORES')
    if #first == 0 then return false end
    local list = list_of(first[1])
    local head = redis.call('LINDEX', list, 0)
    if head and need(head) > room then return false end
    local msg = redis.call('LPOP', list)
    if redis.call('LLEN', list) == 0 then redis.call('ZREM', KEYS[11], first[1]) end
    if msg then
      redis.call('HSET', KEYS[12], '_clock', first[2])
      return msg
    end
  end
end
local function next_parked(room)
  local others = redis.call('LLEN', KEYS[3]) + redis.call('ZCARD', KEYS[11]) > 0
  local urgent = redis.call('LLEN', KEYS[9]) > 0 and
    (not others or redis.call('GET', KEYS[10]) ~= 'urgent')
  if urgent then
    if need(redis.call('LINDEX', KEYS[9], 0)) > room then return false, nil end
    redis.call('SET', KEYS[10], 'urgent')
    return redis.call('LPOP', KEYS[9]), nil
  end
  local msg = ordinary(room)
  if not msg then return false, nil end
  redis.call('SET', KEYS[10], 'other')
  local m = cjson.decode(msg)
  return msg, charge(m.group or 'default', estimate(m.group or 'default', m.weight or 1))
end
local function wake()
  local woken = {}
  if redis.call('EXISTS', KEYS[2]) == 1 then return woken end
  while parked() > 0 do
    local room = cap == 0 and math.huge or cap - used()
    if room < 1 then break end
    local msg, pre = next_parked(room)
    if not msg then break end
    local id = cjson.decode(msg).id
    redis.call('ZADD', KEYS[1], now + lease, 'woken:' .. id)
    set_amount('woken:' .. id, need(msg))
    redis.call('HSET', KEYS[4], id, cjson.encode({at=now, msg=msg, pre=pre}))
    redis.call('SADD', KEYS[8], scope)
    woken[#woken + 1] = msg
  end
  if parked() == 0 then
    redis.call('SREM', KEYS[6], scope)
    redis.call('DEL', KEYS[10])
  end
  return woken
end
"""
)
# Park a message behind the others of its kind: urgent (its `lane`), or of its group (`first`:
# ahead of them, where its turn had come already).
_PARK = """
local function park(msg, first)
  local m = cjson.decode(msg)
  local push = first and 'LPUSH' or 'RPUSH'
  if m.lane == 'urgent' then
    redis.call(push, KEYS[9], msg)
    return
  end
  local g = m.group or 'default'
  redis.call(push, list_of(g), msg)
  joins(g)
end
"""
# ARGV[4] holder token, ARGV[5] task id, ARGV[6] the message to park ('' = only try), ARGV[7]
# the download's group, ARGV[8] its weight, ARGV[9] the lease's amount (1 but for a weighted
# lease; a holder asking again with more grows its lease where the difference fits, else is
# refused without parking).
# Returns {status, pttl}: 1 granted, 0 parked (or not granted), -1 parked behind a pause.
_ACQUIRE = (
    _NOW
    + _PARKED
    + _GROUPS
    + _AMOUNTS
    + _PARK
    + """
local holder, id, g, weight = ARGV[4], ARGV[5], ARGV[7], tonumber(ARGV[8])
local amount = tonumber(ARGV[9] or '1')
cap = tonumber(ARGV[2])
redis.call('SET', KEYS[5], cap)
local waking = redis.call('HGET', KEYS[4], id)
local pre, since = nil, nil
if waking then
  local ok, entry = pcall(cjson.decode, waking)
  if ok and type(entry.pre) == 'number' then pre, since = entry.pre, entry.at end
end
if redis.call('HDEL', KEYS[4], id) == 1 and redis.call('HLEN', KEYS[4]) == 0 then
  redis.call('SREM', KEYS[8], scope)
end
local holding = redis.call('ZSCORE', KEYS[1], holder)
local kept = redis.call('ZSCORE', KEYS[1], 'woken:' .. id)
local again = false
if kept or holding then
  local had = tonumber(redis.call('HGET', KEYS[14], holding and holder or 'woken:' .. id) or '1')
  -- A woken run takes what was kept for it; a weighted holder asking again is measured afresh
  -- (what it wrote since is gone from the free space its cap is measured from).
  local taken = amount <= had and (not holding or amount == 1)
  local fits = taken or cap == 0 or used() - had + amount <= cap
  redis.call('ZREM', KEYS[1], 'woken:' .. id)
  redis.call('HDEL', KEYS[14], 'woken:' .. id)
  if fits then
    redis.call('ZADD', KEYS[1], now + lease, holder)
    set_amount(holder, amount)
    -- Its slot time counts from when the slot was kept for it: nobody else could have it since.
    if not holding then hold(holder, g, weight, pre, since) end
    return {1, 0}
  end
  if holding then return {0, 0} end
  -- Woken for less than it now needs: it waits again, first in line (its turn had come).
  again = true
end
local paused = redis.call('PTTL', KEYS[2])
local full = cap > 0 and used() + amount > cap
if paused <= 0 and not full and parked() == 0 then
  redis.call('ZADD', KEYS[1], now + lease, holder)
  set_amount(holder, amount)
  hold(holder, g, weight, nil)
  return {1, 0}
end
if ARGV[6] == '' then return {0, 0} end
park(ARGV[6], again)
redis.call('SADD', KEYS[6], scope)
redis.call('HINCRBY', KEYS[7], 'deferrals ' .. scope, 1)
if paused > 0 then return {-1, paused} end
return {0, 0}
"""
)
# ARGV[4] holder token, ARGV[5] its amount from now on ('': as it is; a weighted lease shrinks
# as its holder uses what it reserved). Returns 1 when the lease was renewed, 0 when it is gone.
_RENEW = (
    _NOW
    + _AMOUNTS
    + """
if redis.call('ZSCORE', KEYS[1], ARGV[4]) then
  redis.call('ZADD', KEYS[1], now + lease, ARGV[4])
  if ARGV[5] ~= '' then set_amount(ARGV[4], tonumber(ARGV[5])) end
  return 1
end
return 0
"""
)
# ARGV[4] holder token. Returns the woken messages.
_RELEASE = (
    _NOW
    + _WAKE
    + """
redis.call('ZREM', KEYS[1], ARGV[4])
redis.call('HDEL', KEYS[14], ARGV[4])
settle_held(ARGV[4], false)
if string.sub(ARGV[4], 1, 6) == 'woken:' then  -- a slot kept for a run that did not take it
  if redis.call('HDEL', KEYS[4], string.sub(ARGV[4], 7)) == 1 and
      redis.call('HLEN', KEYS[4]) == 0 then
    redis.call('SREM', KEYS[8], scope)
  end
end
return wake()
"""
)
# The sweep: wake what a pause or an ended lease freed, and hand back stale `waking` entries.
# ARGV[4] how old a `waking` entry is when its publisher is taken for dead (ms).
_SWEEP = (
    _NOW
    + _WAKE
    + """
local gone = redis.call('HKEYS', KEYS[13])
for _, holder in ipairs(gone) do
  if not redis.call('ZSCORE', KEYS[1], holder) then settle_held(holder, true) end
end
for _, holder in ipairs(redis.call('HKEYS', KEYS[14])) do
  if not redis.call('ZSCORE', KEYS[1], holder) then redis.call('HDEL', KEYS[14], holder) end
end
local out = wake()
local all = redis.call('HGETALL', KEYS[4])
for i = 1, #all, 2 do
  local ok, entry = pcall(cjson.decode, all[i + 1])
  if not ok then  -- written as '<ms>|<message>' by workers before the JSON entries
    local bar = string.find(all[i + 1], '|', 1, true)
    entry = {at=tonumber(string.sub(all[i + 1], 1, bar - 1)), msg=string.sub(all[i + 1], bar + 1)}
  end
  if now - entry.at > tonumber(ARGV[4]) then
    redis.call('HSET', KEYS[4], all[i], cjson.encode({at=now, msg=entry.msg, pre=entry.pre}))
    out[#out + 1] = entry.msg
  end
end
-- Entries written before the index was kept are found by a scan: from then on, indexed.
if #all == 0 then redis.call('SREM', KEYS[8], scope) else redis.call('SADD', KEYS[8], scope) end
return out
"""
)
# ARGV[4] the pause in ms.
_PAUSE = """
local left = redis.call('PTTL', KEYS[2])
if left < tonumber(ARGV[4]) then
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[4])
  redis.call('HINCRBY', KEYS[7], 'pauses ' .. ARGV[1], 1)
end
return 1
"""

# Parking until a time. KEYS: the due set. ARGV: the wait in ms (from Redis's clock), the message.
_PARK_UNTIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[2])
return 1
"""
# The messages whose time has come, at most ARGV[2]: each is taken by moving its time ARGV[1] ms
# ahead, so a sweep that dies before it has published them leaves them to the next one.
_DUE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]))
for _, msg in ipairs(due) do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), msg) end
return due
"""

# Bandwidth budgets (tasks/core/bandwidth.py): each scope is a virtual clock, the time in
# microseconds at which the bytes granted so far will have been sent at the scope's rate (GCRA:
# the generic cell rate algorithm). Taking n bytes moves it on by n / rate; the taker waits until
# it is no more than the tolerance ahead of now. Nothing is held between calls: a taker that dies
# leaves only the bytes it took last, which it already received.
# KEYS: stats, then one clock per scope. ARGV: bytes, tolerance us, then scope and rate by scope.
# Returns the wait in milliseconds (0: go on).
_PACE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local n, tolerance, wait = tonumber(ARGV[1]), tonumber(ARGV[2]), 0
for i = 2, #KEYS do
  local scope, rate = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  local clock = math.max(tonumber(redis.call('GET', KEYS[i]) or '0'), now) + n * 1000000 / rate
  redis.call('SET', KEYS[i], string.format('%.0f', clock), 'PX',
             math.ceil((clock - now) / 1000) + 60000)
  wait = math.max(wait, clock - now - tolerance)
  redis.call('HINCRBY', KEYS[1], 'bytes ' .. scope, n)
  redis.call('HSET', KEYS[1], 'rate ' .. scope, rate, 'seen ' .. scope, t[1])
end
redis.call('PEXPIRE', KEYS[1], 604800000)  -- a week without any budget: the figures go
return math.ceil(wait / 1000)
"""


def rate_key(scope: str) -> str:
    """A bandwidth scope's clock; the client reads it under the same name
    (download_client/records.py, `bandwidth`)."""
    return f"{RATE_PREFIX}{scope}"


# --- what a round trip takes and returns ---------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """One task's claim on one destination. `flight` is what makes two downloads the same
    download; `waited_for` the holder whose result this task may take instead."""

    dest: str
    flight: str
    task_id: str
    ttl_ms: int
    waited_for: str | None = None


@dataclass(frozen=True)
class Held:
    """Someone else's claim (`done` is None while it runs), or this task's own earlier end."""

    task: str
    done: dict[str, Any] | None = None
    self_done: bool = False


@dataclass(frozen=True)
class State:
    """A task state encoded by the result backend, stored unless a SUCCESS is there already (or
    a FAILURE or REVOKED, for a state that is not final)."""

    key: str
    value: str
    expires: int


@dataclass(frozen=True)
class Lease:
    """A slot of one budget's scope for one holder (a run of a task)."""

    kind: str
    scope: str
    holder: str
    task_id: str
    cap: int
    lease_ms: int
    group: str = "default"  # the submitter group whose share the slot's time counts against
    weight: float = 1.0
    amount: int = 1  # what the lease counts against the cap (a disk reservation: its bytes)
    # The cap is measured, not configured (a volume's free space): a release or a sweep stores
    # it first, so what they wake fits what is there now.
    measured: bool = False

    @property
    def keys(self) -> BudgetKeys:
        return BudgetKeys(self.kind, self.scope)


@dataclass(frozen=True)
class Admit:
    """A run's first round trip: take the claim, count the delivery, store STARTED, try for a
    slot (each part optional but the count)."""

    task_id: str
    retries: int
    expires: int
    result_key: str  # Celery's key of this task's result (a stored SUCCESS ends the claim)
    claim: Claim | None = None
    started: State | None = None
    lease: Lease | None = None
    deadline: float | None = None  # the deadline (epoch s) this run sets unless one is fixed


@dataclass(frozen=True)
class Admitted:
    holder: Held | None  # who else holds the destination (None: this run does)
    delivered: int  # deliveries of this message, this one included
    attempts: int  # runs of the download so far, this one included
    granted: bool  # the slot tried for is this run's
    deadline: float | None = None  # the download's deadline, as fixed at its first admission
    deadline_fixed_now: bool = False  # this admission fixed it (the download's first)


@dataclass(frozen=True)
class Settle:
    """A run's last writes, in one round trip: its final state, the claim (with the result left
    for waiters, or without), the slot, the bytes received, and uncounting a run that did not
    download."""

    final: State | None = None
    claim: Claim | None = None
    left: dict[str, Any] | None = None
    release: tuple[Lease, ...] = ()  # the slots given back (a group's, an origin's)
    bytes_for: tuple[str, int] | None = None
    uncount: tuple[str, int] | None = None


@dataclass(frozen=True)
class Settled:
    stored: bool  # the final state was written (False: a SUCCESS was there already, or none)
    woken: list[str] = field(default_factory=list)  # parked messages a released slot woke


class _Round:
    """One pipeline; each command's answer is read back by the name it was queued under."""

    def __init__(self, client: Any) -> None:
        self.pipe = client.pipeline(transaction=False)
        self.at: dict[str, int] = {}

    def add(self, name: str, queue: Callable[[Any], Any]) -> None:
        self.at[name] = len(self.pipe)
        queue(self.pipe)

    def run(self) -> dict[str, Any]:
        answers = self.pipe.execute()
        return {name: answers[i] for name, i in self.at.items()}


def _eval(pipe: Any, script: str, keys: Iterable[str], *argv: Any) -> Any:
    """EVAL with the text: Redis caches it by its SHA, and a pipeline needs no SCRIPT EXISTS
    round trip before it runs (as a registered Script would)."""
    keys = list(keys)
    return pipe.eval(script, len(keys), *keys, *(str(a) for a in argv))


def _budget(pipe: Any, script: str, lease: Lease, *argv: Any) -> Any:
    return _eval(pipe, script, lease.keys.names, lease.scope, lease.cap, lease.lease_ms, *argv)


def _texts(raw: Iterable[Any]) -> list[str]:
    return [m.decode() if isinstance(m, bytes) else m for m in raw]


class Ledger:
    """The workers' side of the download's Redis state, on one client (the result backend's)."""

    def __init__(self, client: Any) -> None:
        self.client = client

    # A download's two round trips.

    def admit(self, a: Admit) -> Admitted:
        r = _Round(self.client)
        if a.claim is not None:
            c = a.claim
            keys = (claim_key(c.dest), a.result_key, done_key(c.waited_for or "-"))
            r.add("claim", lambda p: _eval(p, _CLAIM, keys, c.task_id, c.flight, c.ttl_ms))
        delivered, attempts = deliveries_key(a.task_id, a.retries), attempts_key(a.task_id)
        r.add("delivered", lambda p: p.incr(delivered).expire(delivered, a.expires))
        r.add("attempts", lambda p: p.incr(attempts).expire(attempts, a.expires))
        started, lease = a.started, a.lease
        if started is not None:
            r.add("started", lambda p: _store(p, started))
        if lease is not None:
            r.add("slot", lambda p: _budget(p, _ACQUIRE, lease, lease.holder, a.task_id, "",
                                            lease.group, lease.weight, lease.amount))  # fmt: skip
        end = a.deadline
        if end is not None:
            # Kept until the deadline, and as long as results after it.
            ttl, key = max(1, math.ceil(end - time.time())) + a.expires, deadline_key(a.task_id)
            r.add("fixed", lambda p: p.set(key, repr(end), nx=True, ex=ttl))
            r.add("deadline", lambda p: p.get(key))
        got = r.run()
        raw_held = got.get("claim")
        held = None if raw_held is None else _held(raw_held)
        granted = "slot" in got and int(got["slot"][0]) == 1
        fixed = float(got["deadline"]) if got.get("deadline") is not None else end
        return Admitted(held, int(got["delivered"]), int(got["attempts"]), granted, fixed,
                        bool(got.get("fixed")))  # fmt: skip

    def settle(self, s: Settle) -> Settled:
        r = _Round(self.client)
        final, claim = s.final, s.claim
        if final is not None:
            r.add("stored", lambda p: _store(p, final))
        if claim is not None:
            r.add("claim", lambda p: _unclaim(p, claim, s.left))
        for i, lease in enumerate(s.release):
            if lease.measured:
                r.add(f"cap {i}", _measuring(lease))
            r.add(f"woken {i}", _releasing(lease))
        if s.bytes_for is not None:
            worker, n = s.bytes_for
            r.add("bytes", lambda p: p.hincrby(BYTES, worker, n))
        if s.uncount is not None:
            task_id, retries = s.uncount
            key, attempts = deliveries_key(task_id, retries), attempts_key(task_id)
            r.add("uncount", lambda p: p.decr(key).decr(attempts))
        got = r.run()
        woken = [m for i in range(len(s.release)) for m in _texts(got[f"woken {i}"] or [])]
        return Settled(bool(got.get("stored")), woken)

    # Results and notes.

    def store_state(self, state: State, only_new: bool = False) -> bool:
        """Store a task state unless a SUCCESS is there, or a FAILURE or REVOKED and the state
        is not final (`only_new`: unless any state is)."""
        return bool(_eval(self.client, _STORE_NEW if only_new else _STORE, [state.key],
                          state.value, state.expires))  # fmt: skip

    def note_retry(self, task_id: str, note: str, ttl: int) -> None:
        self.client.set(retry_note_key(task_id), note, ex=ttl)

    def record_given_up(self, task_id: str, record: dict[str, Any], ttl: int) -> None:
        self.client.set(given_up_key(task_id), json.dumps(record), ex=ttl)

    def uncount(self, runs: Iterable[tuple[str, int]]) -> None:
        """Take back deliveries stopped on purpose (a shutdown), not by a death."""
        pipe = self.client.pipeline()
        for task_id, retries in runs:
            pipe.decr(deliveries_key(task_id, retries))
        pipe.execute()

    def release_claim(self, claim: Claim) -> None:
        _unclaim(self.client, claim, None)

    # Totals.

    def count_recycled(self, worker: str, n: int) -> None:
        self.client.hincrby(RECYCLED, worker, n)

    def totals(self) -> tuple[dict[str, int], dict[str, int]]:
        """Bytes and recycled children per worker."""
        got = _Round(self.client)
        got.add("bytes", lambda p: p.hgetall(BYTES))
        got.add("recycled", lambda p: p.hgetall(RECYCLED))
        seen = got.run()
        return _counts(seen["bytes"]), _counts(seen["recycled"])

    # Budgets (their rules are in tasks/core/budgets.py).

    def acquire(self, lease: Lease, parked: str = "") -> tuple[bool, int]:
        """Take a slot, or park `parked` (a message) behind the others: (granted, pause ms)."""
        status, left = _budget(self.client, _ACQUIRE, lease, lease.holder, lease.task_id, parked,
                               lease.group, lease.weight, lease.amount)  # fmt: skip
        return int(status) == 1, int(left)

    def renew(self, lease: Lease, amount: int | None = None) -> bool:
        """Keep the lease alive; a weighted one counts `amount` from now on (None: unchanged)."""
        left = "" if amount is None else amount
        return bool(_budget(self.client, _RENEW, lease, lease.holder, left))

    def release(self, lease: Lease) -> list[str]:
        if lease.measured:
            _measuring(lease)(self.client)
        return _texts(_budget(self.client, _RELEASE, lease, lease.holder))

    def pause(self, lease: Lease, ms: int) -> None:
        _budget(self.client, _PAUSE, lease, ms)

    def sweep(
        self,
        kind: str,
        cap_for: Callable[[str], int],
        stale_ms: int,
        lease_ms: int,
        scan: bool = False,
        measured: Iterable[str] = (),
        only: Iterable[str] | None = None,
    ) -> list[str]:
        """Messages of one budget to publish again: woken by a pause or a lease that ended, or
        left in `waking` by a publisher that died. `scan` also looks for `waking` entries
        outside the index, as workers before it wrote them. The `measured` scopes' caps are
        `cap_for`'s, stored first (the others keep the cap their last taker stored); `only`
        limits the sweep to those scopes."""
        measured = set(measured)
        r, index = _Round(self.client), BudgetKeys(kind, "")
        r.add("parked", lambda p: p.smembers(index.parked_scopes))
        r.add("waking", lambda p: p.smembers(index.waking_scopes))
        got = r.run()
        scopes = set(_texts(got["parked"])) | set(_texts(got["waking"]))
        if scan:
            scopes |= set(_scopes(self.client, kind, "waking"))
        if only is not None:
            scopes &= set(only)
        out: list[str] = []
        for scope in sorted(scopes):
            keys = BudgetKeys(kind, scope).names
            if scope in measured:
                self.client.set(keys[4], cap_for(scope))
            out += _texts(_eval(self.client, _SWEEP, keys, scope, cap_for(scope), lease_ms,
                                stale_ms))  # fmt: skip
        return out

    def park_until(self, kind: str, message: str, wait_ms: int) -> None:
        """Park `message` in a budget's due set until `wait_ms` from now (Redis's clock)."""
        _eval(self.client, _PARK_UNTIL, [BudgetKeys(kind, "").due], wait_ms, message)

    def due(self, kind: str, taken_ms: int, limit: int) -> list[str]:
        """Parked messages whose time has come, taken for `taken_ms` (then due again unless
        `published` says they went out)."""
        return _texts(_eval(self.client, _DUE, [BudgetKeys(kind, "").due], taken_ms, limit))

    def published(self, kind: str, messages: list[str]) -> None:
        if messages:
            self.client.zrem(BudgetKeys(kind, "").due, *messages)

    # Bandwidth budgets.

    def pace(self, scopes: Iterable[tuple[str, int]], n: int, tolerance_us: int) -> int:
        """Take `n` bytes from each (scope, bytes per second) budget; the milliseconds to wait
        before taking more."""
        scopes = list(scopes)
        keys = [RATES_STATS, *(rate_key(scope) for scope, _ in scopes)]
        pairs = [str(v) for scope, rate in scopes for v in (scope, rate)]
        return int(_eval(self.client, _PACE, keys, n, tolerance_us, *pairs))

    def budget_stats(self, kind: str) -> dict[str, Any]:
        """In flight per scope (live leases), deferrals and pauses so far."""
        seconds, micros = self.client.time()
        now_ms = seconds * 1000 + micros // 1000
        flight = {
            scope: int(self.client.zcount(key, now_ms, "+inf"))
            for scope, key in _scopes(self.client, kind, "slots").items()
        }
        counts = _counts(self.client.hgetall(BudgetKeys(kind, "").stats))
        for name in counts:  # a scope seen before and idle now shows 0, not nothing
            flight.setdefault(name.split(" ", 1)[1], 0)
        return {"in_flight": flight, "counts": counts}


def _releasing(lease: Lease) -> Callable[[Any], Any]:
    return lambda pipe: _budget(pipe, _RELEASE, lease, lease.holder)


def _measuring(lease: Lease) -> Callable[[Any], Any]:
    """Store a measured cap, for the scripts that read the stored one (release, sweep)."""
    return lambda pipe: pipe.set(lease.keys.names[4], lease.cap)


def running_by_group(client: Any) -> dict[str, int]:
    """Group -> downloads running: holding a live slot at an origin or of their group's cap (a
    download of a capped group holds both: the larger count stands). Downloads that need
    neither kind of slot (no per-origin cap, no group cap) are not counted."""
    seconds, micros = client.time()
    now_ms = seconds * 1000 + micros // 1000
    by_kind = [_held_by_group(client, kind, now_ms) for kind in ("origin", "group")]
    groups = {g for counts in by_kind for g in counts}
    return {g: max(counts.get(g, 0) for counts in by_kind) for g in sorted(groups)}


def _held_by_group(client: Any, kind: str, now_ms: int) -> dict[str, int]:
    """Group -> holders of a live lease in one budget, from each scope's `held` entries."""
    counts: dict[str, int] = {}
    for scope in _scopes(client, kind, "held"):
        keys = BudgetKeys(kind, scope).names
        live = set(_texts(client.zrangebyscore(keys[0], now_ms, "+inf")))
        for holder, raw in client.hgetall(keys[12]).items():
            if _texts([holder])[0] in live:
                group = str(json.loads(raw).get("g") or "default")
                counts[group] = counts.get(group, 0) + 1
    return counts


def _store(pipe: Any, state: State) -> Any:
    return _eval(pipe, _STORE, [state.key], state.value, state.expires)


def _unclaim(pipe: Any, claim: Claim, left: dict[str, Any] | None) -> Any:
    text = "" if left is None else json.dumps({"task": claim.task_id, "key": claim.flight,
                                                "done": left})  # fmt: skip
    keys = (claim_key(claim.dest), done_key(claim.task_id))
    return _eval(pipe, _UNCLAIM, keys, claim.task_id, text, DONE_TTL_S * 1000)


def _held(raw: Any) -> Held:
    seen = json.loads(raw)
    return Held(seen["task"], seen.get("done"), bool(seen.get("self_done")))


def _counts(raw: dict[Any, Any]) -> dict[str, int]:
    return {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in raw.items()}
