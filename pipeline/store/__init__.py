"""State that must be correct: the effect ledger (idempotency) and item visibility.

:mod:`~pipeline.store.base` holds the contract, :mod:`~pipeline.store.redis` the production implementation and
:mod:`~pipeline.store.memory` an in-memory one with the same semantics.
"""

from pipeline.store.base import EffectKind, Recorded, StateStore, Visibility, VisibilityRecord, visibility_for
from pipeline.store.memory import InMemoryStore
from pipeline.store.redis import RedisStore, redis_client

__all__ = [
    "EffectKind",
    "InMemoryStore",
    "Recorded",
    "RedisStore",
    "StateStore",
    "Visibility",
    "VisibilityRecord",
    "redis_client",
    "visibility_for",
]
