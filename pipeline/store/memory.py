"""An in-memory :class:`~pipeline.store.base.StateStore` with the Redis store's semantics, for unit tests and demos.

It imitates :class:`pipeline.store.redis.RedisStore` (its Lua scripts are the reference): first record wins,
a verdict moves its item's visibility in the same step, visibility follows the highest revision and within one
revision a provisional verdict never overrides a final state, revisions are assigned by message and text as
:meth:`~pipeline.store.base.StateStore.revision` says, entries expire after ``ttl_s`` (measured on ``clock``), and
an appeal outcome moves visibility only over the verdict it supersedes. Setting ``available = False`` makes every
call raise :class:`StoreUnavailable`, as a Redis outage does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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


@dataclass
class _Entry:
    payload: bytes
    published: bool
    expires_at: float


@dataclass
class _Visible:
    state: Visibility
    verdict: bytes
    verdict_id: str
    final: bool
    revision: int
    expires_at: float


@dataclass
class _Revisions:
    latest: int = 0
    latest_hash: str = ""
    by_message: dict[str, int] = field(default_factory=dict)
    expires_at: float = 0.0


class InMemoryStore:
    """A process-local ledger, visibility map and revision register (see the module docstring)."""

    def __init__(self, ttl_s: float = 30 * 24 * 3600, clock: Callable[[], float] = time.time) -> None:
        self.ttl_s = ttl_s
        self.available = True
        self._clock = clock
        self._ledger: dict[tuple[EffectKind, EffectId], _Entry] = {}
        self._visibility: dict[str, _Visible] = {}
        self._revisions: dict[str, _Revisions] = {}

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("in-memory store marked unavailable")

    def _live(self, table: dict, key: object):  # type: ignore[no-untyped-def]
        entry = table.get(key)
        if entry is not None and entry.expires_at <= self._clock():
            del table[key]
            return None
        return entry

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        return None

    async def record(
        self, kind: EffectKind, effect_id: EffectId, payload: bytes, verdict: Verdict | None = None
    ) -> Recorded:
        self._check()
        return self._record(kind, effect_id, payload, verdict)

    async def record_many(
        self, entries: Sequence[tuple[EffectKind, EffectId, bytes, Verdict | None]]
    ) -> list[Recorded]:
        # One check for the batch: a Redis pipeline fails as a whole when the server cannot be reached.
        self._check()
        return [self._record(kind, effect_id, payload, verdict) for kind, effect_id, payload, verdict in entries]

    def _record(self, kind: EffectKind, effect_id: EffectId, payload: bytes, verdict: Verdict | None) -> Recorded:
        existing = self._live(self._ledger, (kind, effect_id))
        if existing is not None:
            return Recorded(existing.payload, created=False, published=existing.published)
        expires = self._clock() + self.ttl_s
        self._ledger[(kind, effect_id)] = _Entry(payload, False, expires)
        if verdict is not None:
            final = verdict.status is VerdictStatus.FINAL
            current = self._live(self._visibility, verdict.content_id)
            current_revision = current.revision if current is not None else 0
            if verdict.revision > current_revision or (
                verdict.revision == current_revision and (final or not current.final)  # type: ignore[union-attr]
            ):
                self._visibility[verdict.content_id] = _Visible(
                    visibility_for(verdict), payload, verdict.verdict_id, final, verdict.revision, expires
                )
        return Recorded(payload, created=True, published=False)

    async def mark_published(self, kind: EffectKind, effect_id: EffectId) -> None:
        self._check()
        self._mark(kind, effect_id)

    async def mark_published_many(self, keys: Sequence[tuple[EffectKind, EffectId]]) -> None:
        self._check()
        for kind, effect_id in keys:
            self._mark(kind, effect_id)

    def _mark(self, kind: EffectKind, effect_id: EffectId) -> None:
        entry = self._live(self._ledger, (kind, effect_id))
        if entry is not None:
            entry.published = True

    async def recorded(self, kind: EffectKind, effect_id: EffectId) -> Recorded | None:
        self._check()
        return self._lookup(kind, effect_id)

    async def recorded_many(self, keys: Sequence[tuple[EffectKind, EffectId]]) -> list[Recorded | None]:
        self._check()
        return [self._lookup(kind, effect_id) for kind, effect_id in keys]

    def _lookup(self, kind: EffectKind, effect_id: EffectId) -> Recorded | None:
        entry = self._live(self._ledger, (kind, effect_id))
        return None if entry is None else Recorded(entry.payload, created=False, published=entry.published)

    async def revision(self, content_id: str, text_hash: str, message_id: str) -> Revision:
        self._check()
        return self._revision(content_id, text_hash, message_id)

    async def revisions(self, messages: Sequence[tuple[str, str, str]]) -> list[Revision]:
        self._check()
        return [self._revision(content_id, text_hash, message_id) for content_id, text_hash, message_id in messages]

    def _revision(self, content_id: str, text_hash: str, message_id: str) -> Revision:
        revisions = self._live(self._revisions, content_id) or _Revisions()
        self._revisions[content_id] = revisions
        revisions.expires_at = self._clock() + self.ttl_s
        known = revisions.by_message.get(message_id)
        if known is not None:
            return Revision(known, False, revisions.latest)
        new = revisions.latest == 0 or revisions.latest_hash != text_hash
        if new:
            revisions.latest += 1
            revisions.latest_hash = text_hash
        revisions.by_message[message_id] = revisions.latest
        return Revision(revisions.latest, new, revisions.latest)

    async def visibility(self, content_id: str) -> VisibilityRecord:
        self._check()
        entry = self._live(self._visibility, content_id)
        if entry is None:
            return VisibilityRecord(Visibility.UNKNOWN, None, False)
        return VisibilityRecord(entry.state, parse_wire(Verdict, entry.verdict), entry.final)

    async def visibility_after_appeal(self, content_id: str, verdict: Verdict, supersedes: str) -> bool:
        self._check()
        current = self._live(self._visibility, content_id)
        current_id = current.verdict_id if current is not None else None
        if current_id not in (supersedes, verdict.verdict_id):
            return False
        self._visibility[content_id] = _Visible(visibility_for(verdict), verdict.to_bytes(), verdict.verdict_id, True,
                                                verdict.revision, self._clock() + self.ttl_s)
        return True
