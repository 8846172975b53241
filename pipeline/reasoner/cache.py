"""The verdict cache: a repeated text is judged once per (policy version, effort, model).

Why: the same text arrives again and again (copy-paste spam, re-posts, replays), and a gpt-oss-safeguard call
costs seconds of GPU time. The key is the hash of the *normalised* text, the policy version (the content hash of
the policy text, so any edit invalidates every entry of that policy) and the effort; the model name is part of
the key as well, because a 20b answer is no evidence for a 120b deployment.

Texts are normalised first (:mod:`pipeline.texts`), so two texts share an entry only when a reader could not tell
them apart.

Only usable answers are stored (no transport errors). The cache is an optimisation, never a dependency: when
Redis fails, the call goes to the model and the failure is logged and counted. Two identical texts in flight at
once in one worker make one model call (:class:`SingleFlight`), so a burst of duplicates is served from the first
answer as well.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from pipeline.config import RedisSettings
from pipeline.schemas import Effort, ReasonerCall
from pipeline.store.keys import Keyspace, Namespace
from pipeline.texts import text_hash

logger = logging.getLogger(__name__)
T = TypeVar("T")

KEY_VERSION = "v2"  # bump when the normalisation or the stored shape (ReasonerCall) changes
_UNPREFIXED = Keyspace("")


def cache_key(text: str, policy_version: str, effort: Effort, model: str) -> str:
    """``rcache:v2:<model>:<policy version>:<effort>:<sha256 of the normalised text>`` (no content in the key;
    the model name is encoded like every caller-chosen key part), without the store's prefix."""
    return _UNPREFIXED.key(Namespace.VERDICT_CACHE, KEY_VERSION, model, policy_version, Effort(effort).value,
                           text_hash(text))


class VerdictCache(Protocol):
    async def get(self, key: str) -> ReasonerCall | None: ...
    async def put(self, key: str, call: ReasonerCall) -> None: ...
    async def close(self) -> None: ...


class RedisVerdictCache:
    """Answers as ReasonerCall JSON under ``<redis key_prefix><key>``, each with the configured TTL."""

    def __init__(self, settings: RedisSettings, ttl_s: int, client=None) -> None:  # type: ignore[no-untyped-def]
        from pipeline.store.redis import redis_client

        self._redis = client or redis_client(settings, timeout_s=2.0)
        self._prefix = settings.key_prefix
        self._ttl_s = ttl_s

    async def get(self, key: str) -> ReasonerCall | None:
        raw = await self._redis.get(self._prefix + key)
        if raw is None:
            return None
        try:
            return ReasonerCall.model_validate_json(raw)
        except ValueError:
            logger.warning("verdict cache entry %s is unreadable; ignoring it", key)
            return None

    async def put(self, key: str, call: ReasonerCall) -> None:
        await self._redis.set(self._prefix + key, call.model_dump_json(), ex=self._ttl_s)

    async def close(self) -> None:
        await self._redis.aclose()


class InMemoryVerdictCache:
    """The same contract in a dict (tests, demos, a worker without Redis). No TTL: it lives as long as the process."""

    def __init__(self) -> None:
        self.entries: dict[str, str] = {}
        self.gets = 0
        self.puts = 0

    async def get(self, key: str) -> ReasonerCall | None:
        self.gets += 1
        raw = self.entries.get(key)
        return ReasonerCall.model_validate_json(raw) if raw is not None else None

    async def put(self, key: str, call: ReasonerCall) -> None:
        self.puts += 1
        self.entries[key] = call.model_dump_json()

    async def close(self) -> None:
        return None


class SingleFlight:
    """Collapse concurrent calls with the same key into one: followers await the leader's result."""

    def __init__(self) -> None:
        self._in_flight: dict[str, asyncio.Future] = {}

    async def run(self, key: str, make: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """``(result, shared)``; ``shared`` is True for a follower that did not run ``make``."""
        leader = self._in_flight.get(key)
        if leader is not None:
            return await asyncio.shield(leader), True
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            result = await make()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: followers re-raise it, nobody else must
            raise
        else:
            future.set_result(result)
            return result, False
        finally:
            self._in_flight.pop(key, None)
