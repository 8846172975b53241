"""The Redis implementation of the ledger and visibility store (:mod:`pipeline.store.base` has the contract).

Why Redis and not Faust tables: Faust table recovery trusts the broker's high-watermark, which our local broker
reports wrongly after batched writes, and tables cannot be shared by the several roles that touch one item. The
review service's queues, claims and tokens live in the same Redis under the same prefix (:mod:`pipeline.review`);
they reach the client through :attr:`RedisStore.redis` and map connection failures with :meth:`RedisStore.guard`.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.config import RedisSettings
from pipeline.errors import StoreUnavailable
from pipeline.schemas import Verdict, VerdictStatus
from pipeline.store.base import EffectKind, Recorded, Visibility, VisibilityRecord, visibility_for

logger = logging.getLogger(__name__)

# Record an effect once; for verdicts also move visibility, atomically, so the two never disagree.
# A provisional verdict never overrides a final state (a late redelivery must not re-hide a decided item).
_RECORD_SCRIPT = """
local ledger, vis = KEYS[1], KEYS[2]
local payload, ttl, state, verdict_id, is_final, now = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local existing = redis.call('HGET', ledger, 'payload')
if existing then
  return {0, existing, redis.call('HGET', ledger, 'published') or '0'}
end
redis.call('HSET', ledger, 'payload', payload, 'published', '0', 'recorded_at', now)
redis.call('EXPIRE', ledger, ttl)
if state ~= '' then
  local current_final = redis.call('HGET', vis, 'final')
  if is_final == '1' or current_final ~= '1' then
    redis.call('HSET', vis, 'state', state, 'verdict', payload, 'verdict_id', verdict_id,
               'final', is_final, 'updated_at', now)
    redis.call('EXPIRE', vis, ttl)
  end
end
return {1, payload, '0'}
"""


def redis_client(settings: RedisSettings, *, timeout_s: float = 5.0, max_connections: int | None = None) -> Any:
    """The one way modpipe opens Redis: URL and password from the settings, bounded socket timeouts.

    ``max_connections`` gives a pool that *waits* for a free connection (up to ``timeout_s``) instead of failing
    under a burst of concurrent requests: the review service's HTTP handlers share one client that way.
    """
    password = settings.password.get_secret_value() if settings.password else None
    if max_connections is None:
        return aioredis.Redis.from_url(
            settings.url, password=password, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.url, password=password, max_connections=max_connections, timeout=timeout_s * 2,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
    )
    return aioredis.Redis(connection_pool=pool)


class RedisStore:
    """The :class:`~pipeline.store.base.StateStore` in Redis, every key under ``settings.key_prefix``."""

    def __init__(self, settings: RedisSettings, client: aioredis.Redis | None = None) -> None:
        self._settings = settings
        self._prefix = settings.key_prefix
        self._redis = client or redis_client(settings)
        self._record = self._redis.register_script(_RECORD_SCRIPT)

    async def close(self) -> None:
        await self._redis.aclose()

    def key(self, *parts: str) -> str:
        return self._prefix + ":".join(parts)

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def _call(self, awaitable):  # type: ignore[no-untyped-def]
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc

    # -- the effect ledger ------------------------------------------------------------------------------------

    async def record(self, kind: EffectKind, effect_id: str, payload: bytes, verdict: Verdict | None = None) -> Recorded:
        """Record ``payload`` as the one effect of ``kind`` for ``effect_id`` unless one exists already."""
        state, verdict_id, is_final = "", "", "0"
        if verdict is not None:
            state = visibility_for(verdict).value
            verdict_id = verdict.verdict_id
            is_final = "1" if verdict.status is VerdictStatus.FINAL else "0"
        created, stored, published = await self._call(
            self._record(
                keys=[self.key(kind.value, effect_id), self.key("vis", effect_id)],
                args=[payload, self._settings.verdict_ttl_s, state, verdict_id, is_final, f"{time.time():.6f}"],
            )
        )
        return Recorded(payload=bytes(stored), created=bool(int(created)), published=published in (b"1", "1"))

    async def mark_published(self, kind: EffectKind, effect_id: str) -> None:
        await self._call(self._redis.hset(self.key(kind.value, effect_id), "published", "1"))

    async def recorded(self, kind: EffectKind, effect_id: str) -> Recorded | None:
        """The stored effect, if any (used to finish a publish that a crash interrupted)."""
        fields = await self._call(self._redis.hmget(self.key(kind.value, effect_id), "payload", "published"))
        if fields[0] is None:
            return None
        return Recorded(payload=bytes(fields[0]), created=False, published=fields[1] in (b"1", "1"))

    # -- visibility -------------------------------------------------------------------------------------------

    async def visibility(self, content_id: str) -> VisibilityRecord:
        fields = await self._call(self._redis.hmget(self.key("vis", content_id), "state", "verdict", "final"))
        if fields[0] is None:
            return VisibilityRecord(Visibility.UNKNOWN, None, False)
        verdict = Verdict.model_validate_json(fields[1]) if fields[1] else None
        return VisibilityRecord(Visibility(fields[0].decode()), verdict, fields[2] in (b"1", "1"))

    # -- for the review service's queues, claims and tokens (pipeline.review) ----------------------------------

    @property
    def redis(self) -> aioredis.Redis:
        """The client, for the review service's scripts (same prefix; wrap calls in :meth:`guard`)."""
        return self._redis

    async def guard(self, awaitable):  # type: ignore[no-untyped-def]
        """Await a Redis call, turning connection failures into :class:`StoreUnavailable`."""
        return await self._call(awaitable)

    async def visibility_after_appeal(self, content_id: str, verdict: Verdict, supersedes: str) -> bool:
        """Point visibility at an appeal outcome, but only over the verdict it supersedes (or itself, on a retry).

        The ledger records an appeal outcome under its own effect id (``appeal:<content_id>:<round>``), so it
        cannot move visibility itself; this compare-and-set keeps a late retry of an older round from winning.
        """
        script = self._redis.register_script(_APPEAL_VIS_SCRIPT)
        changed = await self._call(
            script(
                keys=[self.key("vis", content_id)],
                args=[supersedes, verdict.verdict_id, visibility_for(verdict).value, verdict.to_bytes(),
                      f"{time.time():.6f}", self._settings.verdict_ttl_s],
            )
        )
        return bool(changed)


_APPEAL_VIS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'verdict_id')
if current ~= ARGV[1] and current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'verdict', ARGV[4], 'verdict_id', ARGV[2], 'final', '1', 'updated_at', ARGV[5])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
return 1
"""
