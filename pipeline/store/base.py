"""What the workers need from the state that must be correct: the effect ledger and item visibility.

The ledger is an outbox keyed by ``(kind, effect_id)``. A worker first *records* the effect it is about to publish
(a final verdict, a provisional verdict, an escalation, a review task, a dead letter); the first record wins and
later attempts get the stored one back. It then publishes the stored payload and marks it published. A
redelivered message therefore republishes at most the identical payload (same ``verdict_id``) and never a second,
different final verdict, even if the model that produced it changed in between.

Effects are keyed by an :data:`EffectId` (a family tag and its parts, see :func:`item_effect`): an item's verdicts,
escalation and review task are per *revision* of the item, so an edit (the same content id with another text) is
moderated again instead of finding the old revision's verdict. :meth:`StateStore.revision` says which revision a
message carries.

Recording a verdict moves the item's visibility in the same atomic step, so the two never disagree. Visibility
follows the highest revision: a verdict on an older revision never moves it; within one revision a provisional
verdict never overrides a final state (a late redelivery must not re-hide a decided item).

Two implementations keep this contract: :class:`pipeline.store.redis.RedisStore` (production) and
:class:`pipeline.store.memory.InMemoryStore` (unit tests and demos without Redis).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pipeline.schemas import Decision, Verdict, VerdictStatus


class Visibility(str, enum.Enum):
    """Whether a platform may show an item."""

    UNKNOWN = "unknown"  # never seen by the pipeline: the platform's own default applies
    VISIBLE = "visible"
    HIDDEN_PENDING = "hidden_pending"  # escalated: hidden until a final verdict
    REMOVED = "removed"


class EffectKind(str, enum.Enum):
    FINAL = "final"
    PROVISIONAL = "provisional"
    ESCALATION = "escalation"
    REVIEW = "review"
    DEAD_LETTER = "deadletter"
    AUDIT = "audit"  # an audit entry for moderation.decisions (a retroaction step)


def visibility_for(verdict: Verdict) -> Visibility:
    if verdict.status is VerdictStatus.PROVISIONAL:
        return Visibility.HIDDEN_PENDING
    return Visibility.VISIBLE if verdict.decision is Decision.ALLOW else Visibility.REMOVED


EffectId = tuple[str, ...]  # (family, part, ...): every part is encoded into the key, so ids cannot collide


def item_effect(content_id: str, revision: int) -> EffectId:
    """The slot of an item revision's verdicts, escalation and review task."""
    return ("item", content_id, str(revision))


def appeal_effect(content_id: str, revision: int, round_: int) -> EffectId:
    """The slot of the outcome of the ``round_``-th appeal of an item revision."""
    return ("appeal", content_id, str(revision), str(round_))


def retro_effect(content_id: str, revision: int, policy_id: str, policy_version: str) -> EffectId:
    """The slot of a retroaction's outcome on an item revision under one enforcing policy version: its
    superseding final verdict (if any) and its audit entry. A family of its own, so it never takes the slot of
    the revision's original verdict (:func:`item_effect`) or of an appeal's (:func:`appeal_effect`), and a second
    run under the same version finds what the first one decided."""
    return ("retro", content_id, str(revision), policy_id, policy_version)


def message_effect(topic: str, partition: int | None, offset: int | None, digest: str) -> EffectId:
    """The slot of a dead letter: one per message (the digest of its bytes tells a reused offset apart)."""
    return ("message", topic, str(partition), str(offset), digest)


@dataclass(frozen=True)
class Revision:
    """Which revision of an item a message carries (see :meth:`StateStore.revision`)."""

    number: int  # 1 for the first text seen, +1 for each different text
    new: bool  # this message introduced the revision
    latest: int  # the highest revision known for the item


@dataclass(frozen=True)
class Recorded:
    """The outcome of recording an effect: the payload to publish and whether it still needs publishing."""

    payload: bytes
    created: bool
    published: bool


@dataclass(frozen=True)
class VisibilityRecord:
    state: Visibility
    verdict: Verdict | None
    final: bool

    @property
    def revision(self) -> int:
        """The revision the current state is about (0 when the item is unknown)."""
        return self.verdict.revision if self.verdict is not None else 0


class StateStore(Protocol):
    """The ledger and visibility contract (see the module docstring). Every method raises
    :class:`~pipeline.errors.StoreUnavailable` when the store cannot be reached."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def record(
        self, kind: EffectKind, effect_id: EffectId, payload: bytes, verdict: Verdict | None = None
    ) -> Recorded:
        """Record ``payload`` as the one effect of ``kind`` for ``effect_id`` unless one exists already; a
        ``verdict`` also moves its item's visibility (see the module docstring)."""
        ...

    async def mark_published(self, kind: EffectKind, effect_id: EffectId) -> None: ...

    async def recorded(self, kind: EffectKind, effect_id: EffectId) -> Recorded | None:
        """The stored effect, if any (used to finish a publish that a crash interrupted)."""
        ...

    async def revision(self, content_id: str, text_hash: str, message_id: str) -> Revision:
        """The revision of ``content_id`` a message carries, assigned atomically.

        A message seen before (``message_id``: where it sits in the log and a digest of its bytes) keeps its
        revision, so a replay is a redelivery; a text equal to the latest revision's text is that revision (a
        producer's duplicate); any other text is a new revision, one above the latest.
        """
        ...

    # One round trip for a whole batch: a worker that handles 32 messages at once would otherwise pay 32 round
    # trips per step. Each entry is applied exactly as the single call would, in the order given.

    async def revisions(self, messages: Sequence[tuple[str, str, str]]) -> list[Revision]:
        """:meth:`revision` for each ``(content_id, text_hash, message_id)``, in order."""
        ...

    async def recorded_many(self, keys: Sequence[tuple[EffectKind, EffectId]]) -> list[Recorded | None]:
        """:meth:`recorded` for each ``(kind, effect_id)``, in order."""
        ...

    async def record_many(
        self, entries: Sequence[tuple[EffectKind, EffectId, bytes, Verdict | None]]
    ) -> list[Recorded]:
        """:meth:`record` for each ``(kind, effect_id, payload, verdict)``, in order (each one atomic on its own)."""
        ...

    async def mark_published_many(self, keys: Sequence[tuple[EffectKind, EffectId]]) -> None:
        """:meth:`mark_published` for each ``(kind, effect_id)``."""
        ...

    async def visibility(self, content_id: str) -> VisibilityRecord: ...

    async def visibility_after_appeal(self, content_id: str, verdict: Verdict, supersedes: str) -> bool:
        """Point visibility at an appeal outcome, but only over the verdict it supersedes (or itself, on a retry)."""
        ...
