"""What the workers need from the state that must be correct: the effect ledger and item visibility.

The ledger is an outbox keyed by ``(kind, effect_id)``. A worker first *records* the effect it is about to publish
(a final verdict, a provisional verdict, an escalation, a review task, a dead letter); the first record wins and
later attempts get the stored one back. It then publishes the stored payload and marks it published. A
redelivered message therefore republishes at most the identical payload (same ``verdict_id``) and never a second,
different final verdict, even if the model that produced it changed in between.

Recording a verdict moves the item's visibility in the same atomic step, so the two never disagree; a provisional
verdict never overrides a final state (a late redelivery must not re-hide a decided item).

Two implementations keep this contract: :class:`pipeline.store.redis.RedisStore` (production) and
:class:`pipeline.store.memory.InMemoryStore` (unit tests and demos without Redis).
"""

from __future__ import annotations

import enum
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


def visibility_for(verdict: Verdict) -> Visibility:
    if verdict.status is VerdictStatus.PROVISIONAL:
        return Visibility.HIDDEN_PENDING
    return Visibility.VISIBLE if verdict.decision is Decision.ALLOW else Visibility.REMOVED


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


class StateStore(Protocol):
    """The ledger and visibility contract (see the module docstring). Every method raises
    :class:`~pipeline.errors.StoreUnavailable` when the store cannot be reached."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...

    async def record(
        self, kind: EffectKind, effect_id: str, payload: bytes, verdict: Verdict | None = None
    ) -> Recorded:
        """Record ``payload`` as the one effect of ``kind`` for ``effect_id`` unless one exists already."""
        ...

    async def mark_published(self, kind: EffectKind, effect_id: str) -> None: ...

    async def recorded(self, kind: EffectKind, effect_id: str) -> Recorded | None:
        """The stored effect, if any (used to finish a publish that a crash interrupted)."""
        ...

    async def visibility(self, content_id: str) -> VisibilityRecord: ...

    async def visibility_after_appeal(self, content_id: str, verdict: Verdict, supersedes: str) -> bool:
        """Point visibility at an appeal outcome, but only over the verdict it supersedes (or itself, on a retry)."""
        ...
