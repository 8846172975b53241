"""The reviewers' queues, claims and decision log in Redis: the state of human review that must be correct.

Layout (every key under the store's prefix):

* ``review:task:<cid>`` (hash): the :class:`~pipeline.schemas.ReviewTask`, its ``state`` (pending, claimed,
  decided), ``queue``, enqueue ``score`` (oldest first), ``holder`` and ``lease_until`` of a claim, the appeal
  ``round`` and the verdict it ``supersedes``, and the decided verdict until it is published (``done``).
* ``review:q:<severity>:<policy>`` and ``review:q:admin`` (sorted sets, score = enqueue time): the queues.
  A claim takes the oldest item of the most severe non-empty queue (admins see the admin queue first); within one
  severity the oldest head across policies wins.
* ``review:leases`` (sorted set, score = lease expiry): claims. An expired lease goes back to its queue at its old
  place the next time anyone claims or reads the counts: no background task has to be alive for it.
* ``review:excl:<cid>`` (set): reviewers who may not claim the item (the decider, for an appeal; whoever skipped).
* ``review:log`` (stream): one :class:`~pipeline.schemas.ReviewDecision` per action, appended in the same atomic
  step as the state change; the service relays it to ``moderation.decisions`` (an outbox) and reads stats and
  feedback from it.

Every transition is one Lua script, so two reviewers can never hold the same item and an action by someone who
does not hold the item changes nothing. The scripts build keys from the prefix and the namespaces of
:mod:`pipeline.store.keys`, so they need a single Redis (or one hash slot), like the rest of the store. Content ids
and policy ids reach the scripts encoded (:func:`~pipeline.store.keys.encode_part`): ids are members and key parts
only in that form, and are decoded when they come back.

One task per item: a newer *revision* of the item (an edit) replaces the task of an older one, whatever state it
was in (what reviewers were deciding about the old text is moot); a task of the same or an older revision is a
redelivery and changes nothing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pipeline.errors import RetryableError, StoreUnavailable
from pipeline.policies.model import SEVERITIES
from pipeline.schemas import ReviewDecision, ReviewTask, parse_wire
from pipeline.store.keys import Namespace, decode_part, encode_part
from pipeline.store.redis import RedisStore


class ReviewBusy(RetryableError):
    """A task cannot be replaced yet: the decision on the item's older revision is still being published."""

# Claim order: the most severe queue first (critical 0 ... low 3); the claim script gets the same table.
SEVERITY_RANK = {severity: rank for rank, severity in enumerate(reversed(SEVERITIES))}
_LUA_SEVERITY_RANK = "{" + ", ".join(f"{s} = {r}" for s, r in SEVERITY_RANK.items()) + "}"
ADMIN_QUEUE = "admin"
LOG_MAXLEN = 1_000_000
SCAN_PER_QUEUE = 200  # items looked at per queue for one claim (past the ones this reviewer may not take)

_LUA_COMMON = """
local P = ARGV[1]
local function tkey(cid) return P .. 'review:task:' .. cid end
local function qkey(q) return P .. 'review:q:' .. q end
local function reap(now)
  local expired = redis.call('ZRANGEBYSCORE', P .. 'review:leases', '-inf', now, 'LIMIT', 0, 200)
  for _, cid in ipairs(expired) do
    redis.call('ZREM', P .. 'review:leases', cid)
    local tk = tkey(cid)
    if redis.call('HGET', tk, 'state') == 'claimed' then
      local q = redis.call('HGET', tk, 'queue')
      redis.call('HSET', tk, 'state', 'pending', 'holder', '', 'lease_until', '0')
      redis.call('ZADD', qkey(q), redis.call('HGET', tk, 'score'), cid)
    end
  end
  return #expired
end
"""

# ARGV: prefix, cid, task_json, queue, score, now, revision. Returns 1 (queued), 0 (known), -1 (busy: the older
# revision's decision is still being published; try again shortly).
_ENQUEUE = _LUA_COMMON + """
local cid, task, q, score, now, revision = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local tk = tkey(cid)
local state, stored, done, old_q = unpack(redis.call('HMGET', tk, 'state', 'revision', 'done', 'queue'))
if state then
  stored = tonumber(stored) or 1
  if revision <= stored then return 0 end
  if state == 'decided' and done ~= '1' then return -1 end
  if old_q then redis.call('ZREM', qkey(old_q), cid) end
  redis.call('ZREM', P .. 'review:leases', cid)
  redis.call('DEL', P .. 'review:excl:' .. cid)
  redis.call('PERSIST', tk)
  redis.call('HDEL', tk, 'supersedes', 'verdict', 'decided_by', 'decided_at')
end
redis.call('HSET', tk, 'task', task, 'state', 'pending', 'queue', q, 'score', score, 'round', '0',
           'revision', revision, 'holder', '', 'lease_until', '0', 'enqueued_at', now, 'done', '0')
redis.call('ZADD', qkey(q), score, cid)
redis.call('SADD', P .. 'review:queues', q)
return 1
"""

# ARGV: prefix, reviewer, now, ttl, is_admin, only_policy ('' = any), scan
_CLAIM = _LUA_COMMON + """
local reviewer, now, ttl, is_admin, only, scan = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5], ARGV[6], tonumber(ARGV[7])
reap(now)
local rank = __SEVERITY_RANK__
local best, best_rank, best_score, best_q = nil, 99, 0, nil
for _, q in ipairs(redis.call('SMEMBERS', P .. 'review:queues')) do
  local r, policy
  if q == 'admin' then
    if is_admin == '1' then r, policy = -1, '' end
  else
    local sev, pol = string.match(q, '^([^:]+):(.+)$')
    if sev and (only == '' or only == pol) then r, policy = rank[sev] or 4, pol end
  end
  if r and r <= best_rank then
    local ids = redis.call('ZRANGE', qkey(q), 0, scan - 1, 'WITHSCORES')
    for j = 1, #ids, 2 do
      local cid, score = ids[j], tonumber(ids[j + 1])
      if redis.call('SISMEMBER', P .. 'review:excl:' .. cid, reviewer) == 0 then
        if best == nil or r < best_rank or score < best_score then
          best, best_rank, best_score, best_q = cid, r, score, q
        end
        break
      end
    end
  end
end
if best == nil then return false end
local tk = tkey(best)
local lease = now + ttl
redis.call('ZREM', qkey(best_q), best)
redis.call('HSET', tk, 'state', 'claimed', 'holder', reviewer, 'lease_until', tostring(lease))
redis.call('ZADD', P .. 'review:leases', lease, best)
return {best, tostring(lease)}
""".replace("__SEVERITY_RANK__", _LUA_SEVERITY_RANK)

# ARGV: prefix, cid, reviewer, now; then per action:
#   decide: verdict_json, log_json, maxlen
#   skip / release: (nothing)
#   escalate: log_json, maxlen
_HELD = _LUA_COMMON + """
local cid, reviewer, now, action = ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5]
local tk = tkey(cid)
local state, holder, lease, decided_by = unpack(redis.call('HMGET', tk, 'state', 'holder', 'lease_until', 'decided_by'))
if not state then return {'missing'} end
if state == 'decided' then
  if action == 'decide' and decided_by == reviewer then
    return {'already', redis.call('HGET', tk, 'verdict') or '', redis.call('HGET', tk, 'done') or '0'}
  end
  return {'decided'}
end
if state ~= 'claimed' or holder ~= reviewer then return {'not_held'} end
if tonumber(lease) <= now then reap(now) return {'expired'} end
redis.call('ZREM', P .. 'review:leases', cid)
if action == 'decide' then
  redis.call('HSET', tk, 'state', 'decided', 'verdict', ARGV[6], 'decided_by', reviewer, 'decided_at', tostring(now),
             'done', '0', 'holder', '', 'lease_until', '0')
  redis.call('SADD', P .. 'review:undone', cid)
  redis.call('XADD', P .. 'review:log', 'MAXLEN', '~', ARGV[8], '*', 'entry', ARGV[7])
  redis.call('RPUSH', P .. 'review:hist:' .. cid, ARGV[7])
  return {'ok', ARGV[6], '0'}
end
local q = redis.call('HGET', tk, 'queue')
if action == 'escalate' then
  q = 'admin'
  redis.call('SADD', P .. 'review:queues', 'admin')
  redis.call('XADD', P .. 'review:log', 'MAXLEN', '~', ARGV[7], '*', 'entry', ARGV[6])
  redis.call('RPUSH', P .. 'review:hist:' .. cid, ARGV[6])
elseif action == 'skip' then
  redis.call('SADD', P .. 'review:excl:' .. cid, reviewer)
end
redis.call('HSET', tk, 'state', 'pending', 'queue', q, 'holder', '', 'lease_until', '0')
redis.call('ZADD', qkey(q), redis.call('HGET', tk, 'score'), cid)
return {'ok'}
"""

# ARGV: prefix, cid, now, task_json ('' = keep stored), queue, exclude ('' = nobody), supersedes, log_json, maxlen,
#       revision (of the verdict appealed)
_APPEAL = _LUA_COMMON + """
local cid, now, task, q, exclude, supersedes, revision = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[10]
local tk = tkey(cid)
local state, done, stored = unpack(redis.call('HMGET', tk, 'state', 'done', 'revision'))
if state and (tonumber(stored) or 1) ~= tonumber(revision) then
  if task == '' then return {'no_item'} end
  state = nil  -- the stored task is about another revision: the appeal brings the text it is about
  redis.call('HSET', tk, 'round', '0')
end
if state == 'pending' or state == 'claimed' then return {'open'} end
if state == 'decided' and done ~= '1' then return {'busy'} end
if not state and task == '' then return {'no_item'} end
if task ~= '' and not state then redis.call('HSET', tk, 'task', task, 'revision', revision) end
local round = redis.call('HINCRBY', tk, 'round', 1)
redis.call('PERSIST', tk)
redis.call('HSET', tk, 'state', 'pending', 'queue', q, 'score', now, 'holder', '', 'lease_until', '0',
           'supersedes', supersedes, 'enqueued_at', now, 'verdict', '', 'decided_by', '', 'done', '0')
redis.call('DEL', P .. 'review:excl:' .. cid)
if exclude ~= '' then redis.call('SADD', P .. 'review:excl:' .. cid, exclude) end
redis.call('ZADD', qkey(q), now, cid)
redis.call('SADD', P .. 'review:queues', q)
redis.call('XADD', P .. 'review:log', 'MAXLEN', '~', ARGV[9], '*', 'entry', ARGV[8])
redis.call('PERSIST', P .. 'review:hist:' .. cid)
redis.call('RPUSH', P .. 'review:hist:' .. cid, ARGV[8])
return {'ok', tostring(round)}
"""

# ARGV: prefix, now
_REAP = _LUA_COMMON + """
return reap(tonumber(ARGV[2]))
"""


class Outcome(str, Enum):
    """How an action on a held item ended."""

    OK = "ok"
    ALREADY = "already"  # the same reviewer decided it before (a retried request): the stored verdict stands
    DECIDED = "decided"  # someone else decided it
    NOT_HELD = "not_held"
    EXPIRED = "expired"
    MISSING = "missing"


@dataclass(frozen=True)
class Claim:
    content_id: str
    lease_until: float


@dataclass(frozen=True)
class TaskState:
    """A task as stored, with where it stands."""

    task: ReviewTask
    state: str
    queue: str
    enqueued_at: float
    holder: str | None
    lease_until: float | None
    round: int
    supersedes: str | None
    verdict_json: str | None
    decided_by: str | None
    done: bool


@dataclass(frozen=True)
class QueueCount:
    queue: str
    severity: str
    policy_id: str
    pending: int
    oldest_age_s: float | None


def queue_name(severity: str, policy_id: str) -> str:
    """``<severity>:<policy id>``, the policy id encoded (it becomes part of the queue's key)."""
    return f"{severity}:{encode_part(policy_id)}"


def _split_queue(name: str) -> tuple[str, str]:
    """(severity, policy id) of a queue name; ("", "") for the admin queue."""
    if name == ADMIN_QUEUE:
        return "", ""
    severity, _, policy = name.partition(":")
    return severity, decode_part(policy)


def queue_for(task: ReviewTask, severities: dict[str, str]) -> str:
    """The queue of a task: its most severe policy (unknown policies count as medium), ties to the first listed."""
    ranked = sorted(
        task.policy_ids, key=lambda p: (SEVERITY_RANK.get(severities.get(p, "medium"), 9), task.policy_ids.index(p))
    )
    policy = ranked[0]
    return queue_name(severities.get(policy, "medium"), policy)


def _s(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


class ReviewQueue:
    """Atomic queue operations over the store's Redis connection."""

    def __init__(self, store: RedisStore, severities: dict[str, str] | None = None) -> None:
        self.store = store
        self.severities = dict(severities or {})
        redis = store.redis
        self._enqueue = redis.register_script(_ENQUEUE)
        self._claim = redis.register_script(_CLAIM)
        self._held = redis.register_script(_HELD)
        self._appeal = redis.register_script(_APPEAL)
        self._reap = redis.register_script(_REAP)

    @property
    def prefix(self) -> str:
        return self.store.keys.prefix

    def _task_key(self, content_id: str) -> str:
        return self.store.key(Namespace.REVIEW_TASK, content_id)

    async def _run(self, script, args: list[Any]):  # type: ignore[no-untyped-def]
        return await self.store.guard(script(keys=[], args=[self.prefix, *args]))

    # -- intake -----------------------------------------------------------------------------------------------

    async def enqueue(self, task: ReviewTask) -> bool:
        """Queue a task unless its item has one of the same or a newer revision. True if added (a task of an
        older revision is replaced). :class:`ReviewBusy` while the older revision's decision is being published."""
        queue = queue_for(task, self.severities)
        added = int(await self._run(
            self._enqueue,
            [encode_part(task.item.content_id), task.model_dump_json(), queue, f"{task.created_at.timestamp():.6f}",
             time.time(), task.revision],
        ))
        if added < 0:
            raise ReviewBusy(f"{task.item.content_id}: the decision on an older revision is still being published")
        return bool(added)

    # -- claims -----------------------------------------------------------------------------------------------

    async def claim(self, reviewer: str, ttl_s: float, *, admin: bool = False, policy_id: str | None = None,
                    now: float | None = None) -> Claim | None:
        """Hold the next item for ``ttl_s`` seconds, or None if no queue has one this reviewer may take."""
        result = await self._run(
            self._claim,
            [reviewer, now if now is not None else time.time(), ttl_s, "1" if admin else "0", policy_id or "",
             SCAN_PER_QUEUE],
        )
        if not result:
            return None
        return Claim(content_id=decode_part(_s(result[0]) or ""), lease_until=float(_s(result[1]) or 0))

    async def _held_action(self, action: str, content_id: str, reviewer: str, *extra: Any,
                           now: float | None = None) -> list[str]:
        result = await self._run(
            self._held, [encode_part(content_id), reviewer, now if now is not None else time.time(), action, *extra]
        )
        return [_s(r) or "" for r in result]

    async def record_decision(self, content_id: str, reviewer: str, verdict_json: str, entry: ReviewDecision,
                              now: float | None = None) -> tuple[Outcome, str | None, bool]:
        """Mark a held item decided with ``verdict_json`` and log ``entry``, atomically.

        Returns the outcome, the verdict to publish (the stored one when this is a retry) and whether that verdict
        was already fully published.
        """
        result = await self._held_action(
            "decide", content_id, reviewer, verdict_json, entry.model_dump_json(), LOG_MAXLEN, now=now
        )
        outcome = Outcome(result[0])
        if outcome in (Outcome.OK, Outcome.ALREADY):
            return outcome, result[1] or None, result[2] == "1"
        return outcome, None, False

    async def skip(self, content_id: str, reviewer: str, now: float | None = None) -> Outcome:
        """Give a held item back; this reviewer will not be offered it again."""
        return Outcome((await self._held_action("skip", content_id, reviewer, now=now))[0])

    async def release(self, content_id: str, reviewer: str, now: float | None = None) -> Outcome:
        """Give a held item back to its queue (anyone may take it next)."""
        return Outcome((await self._held_action("release", content_id, reviewer, now=now))[0])

    async def escalate(self, content_id: str, reviewer: str, entry: ReviewDecision, now: float | None = None) -> Outcome:
        """Move a held item to the admin queue, logging ``entry``."""
        result = await self._held_action("escalate", content_id, reviewer, entry.model_dump_json(), LOG_MAXLEN,
                                         now=now)
        return Outcome(result[0])

    async def mark_done(self, content_id: str, keep_s: int) -> None:
        """The decided verdict is published: drop it from the recovery set and let the task expire after ``keep_s``."""
        redis = self.store.redis
        pipe = redis.pipeline(transaction=True)
        pipe.hset(self._task_key(content_id), "done", "1")
        pipe.srem(self.store.key(Namespace.REVIEW_UNDONE), encode_part(content_id))
        pipe.expire(self._task_key(content_id), keep_s)
        pipe.expire(self.store.key(Namespace.REVIEW_HISTORY, content_id), keep_s)
        await self.store.guard(pipe.execute())

    async def undone(self) -> list[str]:
        """Items decided but not yet confirmed published (a crash between the two): the service finishes them."""
        members = await self.store.guard(self.store.redis.smembers(self.store.key(Namespace.REVIEW_UNDONE)))
        return sorted(decode_part(_s(m) or "") for m in members)

    async def reap(self, now: float | None = None) -> int:
        """Return expired claims to their queues now (claims also do this)."""
        return int(await self._run(self._reap, [now if now is not None else time.time()]))

    # -- appeals ----------------------------------------------------------------------------------------------

    async def appeal(self, content_id: str, *, task: ReviewTask | None, exclude: str | None, supersedes: str,
                     entry: ReviewDecision, revision: int, now: float | None = None) -> tuple[str, int]:
        """Re-queue a decided item revision for another look. Returns (outcome, round): ok, open, busy or no_item.

        ``task`` (built from the appeal's item) is used when no task of ``revision`` is stored."""
        stored = await self.get(content_id)
        usable = stored if stored is not None and stored.task.revision == revision else None
        source = usable.task if usable else task
        queue = queue_for(source, self.severities) if source else queue_name("medium", "unknown")
        result = await self._run(
            self._appeal,
            [encode_part(content_id), now if now is not None else time.time(),
             "" if usable or task is None else task.model_dump_json(), queue, exclude or "", supersedes,
             entry.model_dump_json(), LOG_MAXLEN, revision],
        )
        result = [_s(r) or "" for r in result]
        return result[0], int(result[1]) if len(result) > 1 else 0

    # -- reading ----------------------------------------------------------------------------------------------

    def _queue_key(self, name: str) -> str:
        # Queue names are built by queue_name (severity from a fixed set, policy id encoded): already key-safe.
        return self.store.keys.prefix + Namespace.REVIEW_QUEUE.value + ":" + name

    async def get(self, content_id: str) -> TaskState | None:
        fields = await self.store.guard(self.store.redis.hgetall(self._task_key(content_id)))
        if not fields or b"task" not in fields:
            return None
        f = {k.decode(): v.decode() for k, v in fields.items()}
        lease = float(f.get("lease_until") or 0)
        return TaskState(
            task=parse_wire(ReviewTask, f["task"]),
            state=f.get("state", "pending"),
            queue=f.get("queue", ""),
            enqueued_at=float(f.get("score") or 0),
            holder=f.get("holder") or None,
            lease_until=lease or None,
            round=int(f.get("round") or 0),
            supersedes=f.get("supersedes") or None,
            verdict_json=f.get("verdict") or None,
            decided_by=f.get("decided_by") or None,
            done=f.get("done") == "1",
        )

    async def history(self, content_id: str) -> list[ReviewDecision]:
        """Every action on the item so far (decisions, escalations, appeals), oldest first."""
        raw = await self.store.guard(self.store.redis.lrange(self.store.key(Namespace.REVIEW_HISTORY, content_id), 0, -1))
        return [parse_wire(ReviewDecision, r) for r in raw]

    async def excluded(self, content_id: str) -> set[str]:
        members = await self.store.guard(self.store.redis.smembers(self.store.key(Namespace.REVIEW_EXCLUDED, content_id)))
        return {_s(m) or "" for m in members}

    async def queues(self) -> list[str]:
        members = await self.store.guard(self.store.redis.smembers(self.store.key(Namespace.REVIEW_QUEUES)))
        return sorted((_s(m) or "" for m in members), key=_queue_order)

    async def counts(self, now: float | None = None) -> tuple[list[QueueCount], int]:
        """Pending items and the age of the oldest per queue (most severe first), and how many are claimed."""
        now = now if now is not None else time.time()
        await self.reap(now)
        redis = self.store.redis
        names = await self.queues()
        pipe = redis.pipeline(transaction=False)
        for name in names:
            key = self._queue_key(name)
            pipe.zcard(key)
            pipe.zrange(key, 0, 0, withscores=True)
        pipe.zcard(self.store.key(Namespace.REVIEW_LEASES))
        raw = await self.store.guard(pipe.execute())
        counts = []
        for i, name in enumerate(names):
            total, head = raw[2 * i], raw[2 * i + 1]
            severity, policy = _split_queue(name)
            counts.append(QueueCount(name, severity, policy, int(total), now - head[0][1] if head else None))
        return counts, int(raw[-1])

    async def pending(self, limit: int = 100) -> list[ReviewTask]:
        """Pending tasks, oldest first across every queue."""
        redis = self.store.redis
        heads: list[tuple[float, str]] = []
        for name in await self.queues():
            for cid, score in await self.store.guard(
                redis.zrange(self._queue_key(name), 0, limit - 1, withscores=True)
            ):
                heads.append((score, decode_part(_s(cid) or "")))
        heads.sort()
        tasks = []
        for _, cid in heads[:limit]:
            state = await self.get(cid)
            if state is not None:
                tasks.append(state.task)
        return tasks

    async def pending_count(self) -> int:
        counts, _ = await self.counts()
        return sum(c.pending for c in counts)

    async def log_entries(self, count: int | None = None) -> list[ReviewDecision]:
        """The audit log, oldest first (bounded by ``LOG_MAXLEN``)."""
        key = self.store.key(Namespace.REVIEW_LOG)
        raw = await self.store.guard(self.store.redis.xrange(key, count=count))
        return [parse_wire(ReviewDecision, fields[b"entry"]) for _, fields in raw]

    async def log_after(self, last_id: str, count: int = 500) -> list[tuple[str, ReviewDecision]]:
        key = self.store.key(Namespace.REVIEW_LOG)
        raw = await self.store.guard(self.store.redis.xrange(key, min=f"({last_id}" if last_id else "-", count=count))
        return [(_s(i) or "", parse_wire(ReviewDecision, fields[b"entry"])) for i, fields in raw]


def _queue_order(name: str) -> tuple[int, str]:
    if name == ADMIN_QUEUE:
        return (-1, name)
    severity, policy = _split_queue(name)
    return (SEVERITY_RANK.get(severity, 9), policy)


def severities_from(library: Any) -> dict[str, str]:
    """policy id -> severity, from a :class:`~pipeline.policies.PolicyLibrary`."""
    return {pid: library.get(pid).severity for pid in library.ids()}


def json_or_none(text: str | None) -> dict[str, Any] | None:
    return json.loads(text) if text else None


class InMemoryReviewInbox:
    """The intake side of :class:`ReviewQueue` in memory: one task per item, in its severity queue.

    Imitates the enqueue script: a task of the same or an older revision than the item's stored one is refused, a
    newer revision replaces it. ``available = False`` makes enqueue raise :class:`~pipeline.errors.StoreUnavailable`,
    as a Redis outage does.
    """

    def __init__(self, severities: dict[str, str] | None = None) -> None:
        self.severities = dict(severities or {})
        self.tasks: dict[str, tuple[str, ReviewTask]] = {}  # content id -> (queue, task), in arrival order
        self.available = True

    async def enqueue(self, task: ReviewTask) -> bool:
        if not self.available:
            raise StoreUnavailable("in-memory review inbox marked unavailable")
        stored = self.tasks.get(task.item.content_id)
        if stored is not None and task.revision <= stored[1].revision:
            return False
        self.tasks[task.item.content_id] = (queue_for(task, self.severities), task)
        return True
