"""How many times each record was handed to a worker's handler: crash-loop protection that survives the crash.

A handler never raises, so a record that is delivered again and again is one its worker *died* on (a segfault in
a native library, the kernel's OOM killer, ``os._exit``): nothing in the process can count that, so the count
lives in Redis. The agent loop (:mod:`pipeline.app`) counts every delivery of a batch; a batch that comes back is
handled one record at a time, each counted on its own (``solo``), so the record that kills the worker is found
and, after ``LimitsSettings.max_attempts`` solo deliveries, dead-lettered while its batch-mates are handled.

:class:`RedisAttempts` is the real one; :class:`InMemoryAttempts` has the same semantics for unit tests.
Counts expire after a day: a record that stops coming back needs no cleanup.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Protocol

from pipeline.codec import Record
from pipeline.errors import StoreUnavailable
from pipeline.store.keys import Namespace
from pipeline.store.redis import RedisStore

ATTEMPTS_TTL_S = 24 * 3600


def _parts(record: Record) -> tuple[str, ...]:
    return tuple(record.message_id.split("|"))  # topic, partition, offset, digest of the bytes


class Attempts(Protocol):
    async def begin(self, records: Sequence[Record], solo: bool) -> list[int]:
        """Count one more delivery of each record (batch or solo count); returns the new counts, in order."""
        ...

    async def done(self, records: Sequence[Record]) -> None:
        """The records were handled: forget their counts."""
        ...


# One command for a whole batch (a pipeline of two commands per record cost a triage worker a tenth of its time).
_BEGIN = """
local counts = {}
for i, key in ipairs(KEYS) do
  counts[i] = redis.call('HINCRBY', key, ARGV[1], 1)
  redis.call('EXPIRE', key, ARGV[2])
end
return counts
"""


class RedisAttempts:
    """Counts in Redis hashes ``<prefix>attempts:<topic>:<partition>:<offset>:<digest>`` (fields batch, solo)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._begin = store.redis.register_script(_BEGIN)

    async def begin(self, records: Sequence[Record], solo: bool) -> list[int]:
        if not records:
            return []
        keys = [self.store.key(Namespace.ATTEMPTS, *_parts(record)) for record in records]
        replies = await self.store.guard(self._begin(keys=keys, args=["solo" if solo else "batch", ATTEMPTS_TTL_S]))
        return [int(count) for count in replies]

    async def done(self, records: Sequence[Record]) -> None:
        if records:
            await self.store.guard(
                self.store.redis.delete(*(self.store.key(Namespace.ATTEMPTS, *_parts(r)) for r in records))
            )


class InMemoryAttempts:
    """:class:`RedisAttempts` in a dict (counts survive only as long as the object: for tests); ``available =
    False`` raises :class:`StoreUnavailable` like a Redis outage."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, ...], dict[str, int]] = {}
        self.available = True

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("in-memory attempts marked unavailable")

    async def begin(self, records: Sequence[Record], solo: bool) -> list[int]:
        self._check()
        field, out = ("solo" if solo else "batch"), []
        for record in records:
            counts = self.counts.setdefault(_parts(record), {})
            counts[field] = counts.get(field, 0) + 1
            out.append(counts[field])
        return out

    async def done(self, records: Sequence[Record]) -> None:
        self._check()
        for record in records:
            self.counts.pop(_parts(record), None)


# -- the lag record a gateway (or `modpipe status`) reads ----------------------------------------------------------


async def write_lag(store: RedisStore, role: str, report: dict[str, Any], ttl_s: float) -> None:
    """Publish a role's lag report (``{"lag": int, "bound": int | None, "exceeded": bool, ...}``) for ``ttl_s``."""
    payload = json.dumps({**report, "at": time.time()})
    await store.guard(store.redis.set(store.key(Namespace.LAG, role), payload, px=max(1, int(ttl_s * 1000))))


async def read_lag(store: RedisStore, role: str) -> dict[str, Any] | None:
    """The latest lag report of ``role`` (None when no worker reported within its time to live)."""
    raw = await store.guard(store.redis.get(store.key(Namespace.LAG, role)))
    return json.loads(raw) if raw else None
