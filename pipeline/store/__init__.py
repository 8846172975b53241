"""State that must be correct: the effect ledger (idempotency) and item visibility.

:mod:`~pipeline.store.base` holds the contract, :mod:`~pipeline.store.redis` the production implementation and
:mod:`~pipeline.store.memory` an in-memory one with the same semantics.
"""

from pipeline.store.base import (
    EffectId,
    EffectKind,
    Recorded,
    Revision,
    StateStore,
    Visibility,
    VisibilityRecord,
    appeal_effect,
    item_effect,
    message_effect,
    retro_effect,
    visibility_for,
)
from pipeline.store.memory import InMemoryStore
from pipeline.store.redis import RedisStore, redis_client

__all__ = [
    "EffectId",
    "EffectKind",
    "InMemoryStore",
    "Recorded",
    "RedisStore",
    "Revision",
    "StateStore",
    "Visibility",
    "VisibilityRecord",
    "appeal_effect",
    "item_effect",
    "message_effect",
    "redis_client",
    "retro_effect",
    "visibility_for",
]
