"""Per-client rate limits: a token bucket per (limit, client) in Redis, shared by every replica of a service.

Why: 300 wrong logins in 1.1 s met no limit. Tokens are 256-bit random, so guessing one is hopeless, but the
bootstrap admin token is whatever an operator typed, and every failed attempt costs a hash, a Redis read and a log
line. A :class:`Limit` allows ``per_minute`` events in a burst of as many, refilling evenly; a client past it is
refused until a token has refilled (``retry_after_s``).

Two calls: :meth:`RedisRateLimiter.hit` spends one event (a login attempt, a failed authentication) and says
whether it was within the limit; :meth:`RedisRateLimiter.check` says whether one more would be, without spending.
Services check a client's failed-authentication budget *before* they look at its credential, so a client that
has used it up gains nothing by guessing on. Both report ``first_refusal`` once per episode (the first refusal
after the client was last within its limit), so a flood gives one log line, not one per request.

Keys: ``<prefix>ratelimit:<limit>:<client>`` (:class:`~pipeline.store.keys.Namespace.RATE_LIMIT`, the client
address encoded like every caller-supplied part); each expires once its bucket would be full again. The clock is
the caller's (``clock``), so replicas should keep theirs in sync (NTP); a clock that goes back never refills.
:class:`InMemoryRateLimiter` is the same arithmetic in a dict, for tests and single-process tools.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from pipeline.store.keys import Namespace
from pipeline.store.redis import RedisStore


@dataclass(frozen=True)
class Limit:
    """``per_minute`` events per client, in bursts of up to ``per_minute``; ``name`` labels keys, logs, metrics."""

    name: str
    per_minute: int

    def __post_init__(self) -> None:
        if self.per_minute < 1:
            raise ValueError("a limit allows at least one event per minute")

    @property
    def rate_per_s(self) -> float:
        return self.per_minute / 60.0

    @property
    def ttl_s(self) -> int:
        """How long until an emptied bucket is full again: after that, no key is the same as a full bucket."""
        return math.ceil(self.per_minute / self.rate_per_s) + 1


@dataclass(frozen=True)
class Allowance:
    allowed: bool
    retry_after_s: float  # 0 when allowed
    first_refusal: bool  # the first refusal of this episode: log it


class RateLimiter(Protocol):
    async def hit(self, limit: Limit, client: str) -> Allowance: ...

    async def check(self, limit: Limit, client: str) -> Allowance: ...


def _bucket(tokens: float | None, ts: float | None, refused: bool, limit: Limit, now: float,
            cost: int) -> tuple[float, float, bool, Allowance]:
    """One step of the bucket: (tokens, ts, refused, allowance) after spending ``cost`` (0: only look)."""
    capacity, rate = float(limit.per_minute), limit.rate_per_s
    tokens = capacity if tokens is None else tokens
    ts = now if ts is None else ts
    if now > ts:
        tokens, ts = min(capacity, tokens + (now - ts) * rate), now
    need = max(cost, 1)
    if tokens >= need:
        if cost:
            return tokens - cost, ts, False, Allowance(True, 0.0, False)
        return tokens, ts, refused, Allowance(True, 0.0, False)
    return tokens, ts, True, Allowance(False, (need - tokens) / rate, not refused)


# The same step in Lua (KEYS[1] the bucket; ARGV capacity, rate, now, cost, ttl). Numbers go back as strings:
# Redis turns a Lua number into an integer.
_BUCKET = """
local cap, rate, now, cost, ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5]
local tokens, ts, refused = unpack(redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'refused'))
tokens = tonumber(tokens) or cap
ts = tonumber(ts) or now
if now > ts then
  tokens = math.min(cap, tokens + (now - ts) * rate)
  ts = now
end
local need = math.max(cost, 1)
if tokens >= need then
  if cost > 0 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - cost), 'ts', tostring(ts), 'refused', '0')
    redis.call('EXPIRE', KEYS[1], ttl)
  end
  return {1, '0', 0}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(ts), 'refused', '1')
redis.call('EXPIRE', KEYS[1], ttl)
return {0, tostring((need - tokens) / rate), refused == '1' and 0 or 1}
"""


class RedisRateLimiter:
    """:class:`RateLimiter` on the store's Redis, keys under its prefix."""

    def __init__(self, store: RedisStore, *, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock
        self._script = store.redis.register_script(_BUCKET)

    async def _step(self, limit: Limit, client: str, cost: int) -> Allowance:
        key = self.store.key(Namespace.RATE_LIMIT, limit.name, client)
        allowed, retry, first = await self.store.guard(self._script(
            keys=[key], args=[limit.per_minute, repr(limit.rate_per_s), repr(self.clock()), cost, limit.ttl_s]))
        retry_s = float(retry.decode() if isinstance(retry, bytes) else retry)
        return Allowance(bool(int(allowed)), retry_s, bool(int(first)))

    async def hit(self, limit: Limit, client: str) -> Allowance:
        return await self._step(limit, client, 1)

    async def check(self, limit: Limit, client: str) -> Allowance:
        return await self._step(limit, client, 0)


class InMemoryRateLimiter:
    """:class:`RedisRateLimiter`'s buckets in one process's memory: the same arithmetic (``_bucket``, which the
    Lua script mirrors), the same first-refusal flag; buckets never expire (a full bucket is the same as none)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.buckets: dict[tuple[str, str], tuple[float, float, bool]] = {}

    def _step(self, limit: Limit, client: str, cost: int) -> Allowance:
        tokens, ts, refused = self.buckets.get((limit.name, client), (None, None, False))
        tokens, ts, refused, allowance = _bucket(tokens, ts, refused, limit, self.clock(), cost)
        if cost or not allowance.allowed:
            self.buckets[(limit.name, client)] = (tokens, ts, refused)
        return allowance

    async def hit(self, limit: Limit, client: str) -> Allowance:
        return self._step(limit, client, 1)

    async def check(self, limit: Limit, client: str) -> Allowance:
        return self._step(limit, client, 0)
