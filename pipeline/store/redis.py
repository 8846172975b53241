"""The Redis implementation of the ledger and visibility store (:mod:`pipeline.store.base` has the contract).

Why Redis and not Faust tables: Faust table recovery trusts the broker's high-watermark, which our local broker
reports wrongly after batched writes, and tables cannot be shared by the several roles that touch one item. The
review service's queues, claims and tokens live in the same Redis under the same prefix (:mod:`pipeline.review`);
they reach the client through :attr:`RedisStore.redis` and map connection failures with :meth:`RedisStore.guard`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import ResponseError as RedisResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pipeline.config import RedisSettings
from pipeline.errors import StoreUnavailable
from pipeline.schemas import Verdict, VerdictStatus, parse_wire
from pipeline.store.base import (
    EffectId,
    EffectKind,
    Recorded,
    Revision,
    Visibility,
    VisibilityRecord,
    visibility_for,
)
from pipeline.store.keys import Keyspace, Namespace

logger = logging.getLogger(__name__)

# Error replies that say the server cannot serve writes *right now* (out of memory, a replica during failover, still
# loading its data after a restart): an outage to wait out, never a reason to dead-letter the message.
_UNAVAILABLE_REPLIES = ("OOM", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "LOADING")

# Record an effect once; for verdicts also move visibility, atomically, so the two never disagree. Visibility follows
# the highest revision; within one revision a provisional verdict never overrides a final state (a late redelivery
# must not re-hide a decided item). Entries written before revisions existed have no 'revision' field: revision 1.
_RECORD_SCRIPT = """
local ledger, vis = KEYS[1], KEYS[2]
local payload, ttl, state, verdict_id, is_final, now, revision =
  ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local existing = redis.call('HGET', ledger, 'payload')
if existing then
  return {0, existing, redis.call('HGET', ledger, 'published') or '0'}
end
redis.call('HSET', ledger, 'payload', payload, 'published', '0', 'recorded_at', now)
redis.call('EXPIRE', ledger, ttl)
if state ~= '' then
  local current_state, current_final, current_revision = unpack(redis.call('HMGET', vis, 'state', 'final', 'revision'))
  current_revision = tonumber(current_revision) or (current_state and 1 or 0)
  if revision > current_revision or (revision == current_revision and (is_final == '1' or current_final ~= '1')) then
    redis.call('HSET', vis, 'state', state, 'verdict', payload, 'verdict_id', verdict_id,
               'final', is_final, 'revision', revision, 'updated_at', now)
    redis.call('EXPIRE', vis, ttl)
  end
end
return {1, payload, '0'}
"""

# Which revision a message carries (see StateStore.revision). One hash per item: 'latest' (number), 'latest_hash'
# (its text hash) and 'm:<message id>' (the revision each message was given).
_REVISION_SCRIPT = """
local revs = KEYS[1]
local text_hash, message_field, ttl = ARGV[1], 'm:' .. ARGV[2], tonumber(ARGV[3])
local known = redis.call('HGET', revs, message_field)
local latest = tonumber(redis.call('HGET', revs, 'latest')) or 0
if known then return {tonumber(known), 0, latest} end
local number, new = latest, 0
if latest == 0 or redis.call('HGET', revs, 'latest_hash') ~= text_hash then
  number = redis.call('HINCRBY', revs, 'latest', 1)
  redis.call('HSET', revs, 'latest_hash', text_hash)
  new = 1
end
redis.call('HSET', revs, message_field, number)
redis.call('EXPIRE', revs, ttl)
return {number, new, math.max(number, latest)}
"""

_APPEAL_VIS_SCRIPT = """
local current = redis.call('HGET', KEYS[1], 'verdict_id')
if current ~= ARGV[1] and current ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'verdict', ARGV[4], 'verdict_id', ARGV[2], 'final', '1',
           'revision', ARGV[7], 'updated_at', ARGV[5])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[6]))
return 1
"""


async def _raise(exc: BaseException) -> None:
    """An error a pipeline returned in place of a reply, raised where :meth:`RedisStore._call` maps it."""
    raise exc


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
    """The :class:`~pipeline.store.base.StateStore` in Redis, every key built by :class:`Keyspace` under
    ``settings.key_prefix``."""

    def __init__(self, settings: RedisSettings, client: aioredis.Redis | None = None) -> None:
        self._settings = settings
        self.keys = Keyspace(settings.key_prefix)
        self._redis = client or redis_client(settings)
        self._record = self._redis.register_script(_RECORD_SCRIPT)
        self._revision = self._redis.register_script(_REVISION_SCRIPT)
        self._appeal_visibility = self._redis.register_script(_APPEAL_VIS_SCRIPT)

    async def close(self) -> None:
        await self._redis.aclose()

    def key(self, namespace: Namespace, *parts: object) -> str:
        return self.keys.key(namespace, *parts)

    def _ledger_key(self, kind: EffectKind, effect_id: EffectId) -> str:
        if not isinstance(effect_id, tuple):  # a bare string would be split into characters: a silent collision
            raise TypeError(f"effect ids are tuples (see pipeline.store.base.item_effect), got {type(effect_id)}")
        return self.keys.key(Namespace.LEDGER, kind.value, *effect_id)

    async def ping(self) -> None:
        await self._call(self._redis.ping())

    async def _call(self, awaitable):  # type: ignore[no-untyped-def]
        try:
            return await awaitable
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreUnavailable(f"redis unavailable: {exc}") from exc
        except RedisResponseError as exc:
            if str(exc).startswith(_UNAVAILABLE_REPLIES):
                raise StoreUnavailable(f"redis cannot serve now: {str(exc)[:120]}") from exc
            raise

    # -- the effect ledger ------------------------------------------------------------------------------------

    def _record_args(self, kind: EffectKind, effect_id: EffectId, payload: bytes,
                     verdict: Verdict | None) -> tuple[list[str], list[Any]]:
        ledger = self._ledger_key(kind, effect_id)
        state, verdict_id, is_final, visibility, revision = "", "", "0", ledger, 0  # no verdict: visibility untouched
        if verdict is not None:
            state = visibility_for(verdict).value
            verdict_id = verdict.verdict_id
            is_final = "1" if verdict.status is VerdictStatus.FINAL else "0"
            visibility, revision = self.keys.key(Namespace.VISIBILITY, verdict.content_id), verdict.revision
        return ([ledger, visibility],
                [payload, self._settings.verdict_ttl_s, state, verdict_id, is_final, f"{time.time():.6f}", revision])

    def _revision_args(self, content_id: str, text_hash: str, message_id: str) -> tuple[list[str], list[Any]]:
        return [self.keys.key(Namespace.REVISIONS, content_id)], [text_hash, message_id, self._settings.verdict_ttl_s]

    @staticmethod
    def _recorded_reply(reply: Any) -> Recorded:
        created, stored, published = reply
        return Recorded(payload=bytes(stored), created=bool(int(created)), published=published in (b"1", "1"))

    @staticmethod
    def _lookup_reply(fields: Any) -> Recorded | None:
        if fields[0] is None:
            return None
        return Recorded(payload=bytes(fields[0]), created=False, published=fields[1] in (b"1", "1"))

    async def _pipelined(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run ``commands`` (``("script", Script, keys, args)`` or ``(method name, *args)``) on one
        non-transactional pipeline: one round trip, each command applied on its own and in order, as if sent one
        by one. Scripts go as EVALSHA; when the server does not know one (a restart flushed its script cache),
        it is loaded and only the commands that were refused for it run again."""
        replies = await self._run_pipeline(commands)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            for script in {id(commands[i][1]): commands[i][1] for i in missing}.values():
                script.sha = await self._call(self._redis.script_load(script.script))
            for i, reply in zip(missing, await self._run_pipeline([commands[i] for i in missing]), strict=True):
                replies[i] = reply
        for reply in replies:
            if isinstance(reply, Exception):
                await self._call(_raise(reply))
        return replies

    async def _run_pipeline(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self._redis.pipeline(transaction=False)
        for command in commands:
            if command[0] == "script":
                _, script, keys, args = command
                pipe.evalsha(script.sha, len(keys), *keys, *args)
            else:
                getattr(pipe, command[0])(*command[1:])
        return list(await self._call(pipe.execute(raise_on_error=False)))

    async def record(
        self, kind: EffectKind, effect_id: EffectId, payload: bytes, verdict: Verdict | None = None
    ) -> Recorded:
        keys, args = self._record_args(kind, effect_id, payload, verdict)
        return self._recorded_reply(await self._call(self._record(keys=keys, args=args)))

    async def record_many(
        self, entries: Sequence[tuple[EffectKind, EffectId, bytes, Verdict | None]]
    ) -> list[Recorded]:
        if not entries:
            return []
        commands = [("script", self._record, *self._record_args(*entry)) for entry in entries]
        return [self._recorded_reply(reply) for reply in await self._pipelined(commands)]

    async def mark_published(self, kind: EffectKind, effect_id: EffectId) -> None:
        await self._call(self._redis.hset(self._ledger_key(kind, effect_id), "published", "1"))

    async def mark_published_many(self, keys: Sequence[tuple[EffectKind, EffectId]]) -> None:
        if keys:
            await self._pipelined([("hset", self._ledger_key(kind, effect_id), "published", "1")
                                   for kind, effect_id in keys])

    async def recorded(self, kind: EffectKind, effect_id: EffectId) -> Recorded | None:
        fields = await self._call(self._redis.hmget(self._ledger_key(kind, effect_id), "payload", "published"))
        return self._lookup_reply(fields)

    async def recorded_many(self, keys: Sequence[tuple[EffectKind, EffectId]]) -> list[Recorded | None]:
        if not keys:
            return []
        commands = [("hmget", self._ledger_key(kind, effect_id), "payload", "published") for kind, effect_id in keys]
        return [self._lookup_reply(fields) for fields in await self._pipelined(commands)]

    async def revision(self, content_id: str, text_hash: str, message_id: str) -> Revision:
        keys, args = self._revision_args(content_id, text_hash, message_id)
        number, new, latest = await self._call(self._revision(keys=keys, args=args))
        return Revision(int(number), bool(int(new)), int(latest))

    async def revisions(self, messages: Sequence[tuple[str, str, str]]) -> list[Revision]:
        if not messages:
            return []
        commands = [("script", self._revision, *self._revision_args(*message)) for message in messages]
        return [Revision(int(n), bool(int(new)), int(latest)) for n, new, latest in await self._pipelined(commands)]

    # -- visibility -------------------------------------------------------------------------------------------

    async def visibility(self, content_id: str) -> VisibilityRecord:
        fields = await self._call(
            self._redis.hmget(self.keys.key(Namespace.VISIBILITY, content_id), "state", "verdict", "final")
        )
        if fields[0] is None:
            return VisibilityRecord(Visibility.UNKNOWN, None, False)
        verdict = parse_wire(Verdict, fields[1]) if fields[1] else None
        return VisibilityRecord(Visibility(fields[0].decode()), verdict, fields[2] in (b"1", "1"))

    async def visibility_after_appeal(self, content_id: str, verdict: Verdict, supersedes: str) -> bool:
        """Point visibility at an appeal outcome, but only over the verdict it supersedes (or itself, on a retry).

        The ledger records an appeal outcome under its own effect id (:func:`appeal_effect`), so it cannot move
        visibility itself; this compare-and-set keeps a late retry of an older round from winning.
        """
        changed = await self._call(
            self._appeal_visibility(
                keys=[self.keys.key(Namespace.VISIBILITY, content_id)],
                args=[supersedes, verdict.verdict_id, visibility_for(verdict).value, verdict.to_bytes(),
                      f"{time.time():.6f}", self._settings.verdict_ttl_s, verdict.revision],
            )
        )
        return bool(changed)

    # -- for the review service's queues, claims and tokens (pipeline.review) ----------------------------------

    @property
    def redis(self) -> aioredis.Redis:
        """The client, for the review service's scripts (same prefix; wrap calls in :meth:`guard`)."""
        return self._redis

    async def guard(self, awaitable):  # type: ignore[no-untyped-def]
        """Await a Redis call, turning connection failures into :class:`StoreUnavailable`."""
        return await self._call(awaitable)
