"""The policy registry: which version of each policy enforces, which are shadowed, and what was done about them.

Why a registry in Redis and not a file in the policies folder: a promotion must reach every worker of every role
at once, on every machine, without a restart or a redeploy, and must be undone the same way. Redis is where the
pipeline already keeps the state that must be correct (the ledger, visibility), every worker already reads it, and
it is persistent in production (AOF; the compose file and the chart run it so). The folder stays the place where
authors write versions (:mod:`pipeline.policies.versions`); the registry holds, per policy:

* the **enforcing pointer** (``policy:enforcing``, one hash field per policy): the version, the versions enforced
  before it (most recent first: what a rollback returns to), who changed it and when. No pointer: the folder's base
  version enforces. A change is a compare-and-set on the version the changer saw, so two promotions racing
  cannot both win, and it is recorded together with its audit entry in one atomic step;
* the **texts** of versions workers may be asked to load (``policy:text``): a promotion, rollback or shadow
  registration stores the text first, so a worker whose image lacks a candidate file can still load it (it checks
  the text hashes to the version before using it);
* **shadow registrations** (``policy:shadow``): version and sample share;
* **reports** that exist for a version (``policy:reports``): golden, backtest and shadow summaries, which
  promotion requires;
* the **history** and an **outbox** of audit entries (:class:`~pipeline.schemas.PolicyAudit`): an entry is written
  in the same atomic step as the change, then published to ``moderation.decisions`` and removed from the outbox;
  whatever a crash left there is published by the next lifecycle command (the same ``audit_id``: consumers dedupe);
* what each worker last said it **runs** (``policy:workers``, ``policy:loaded``), so ``promote --wait`` can tell
  when the whole fleet enforces the new version.

Two implementations keep one contract: :class:`RedisPolicyRegistry` and :class:`InMemoryPolicyRegistry`
(unit tests; the same scenario suite runs on both).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipeline.errors import StoreUnavailable
from pipeline.schemas import PolicyAudit
from pipeline.store.keys import Namespace, encode_part


@dataclass(frozen=True)
class Enforcing:
    """The enforcing pointer of one policy."""

    policy_id: str
    version: str
    previous: tuple[str, ...] = ()  # versions enforced before this one, most recent first
    changed_at: float = 0.0
    change_id: str = ""  # the audit id of the change that set it
    actor: str = ""

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "previous": list(self.previous)}, sort_keys=True)

    @classmethod
    def from_json(cls, raw: str | bytes) -> Enforcing:
        data = json.loads(raw)
        return cls(**{**data, "previous": tuple(data.get("previous", ()))})


@dataclass(frozen=True)
class ShadowRegistration:
    policy_id: str
    version: str
    sample: float | None = None  # None: lifecycle.shadow_sample
    started_at: float = 0.0
    actor: str = ""


@dataclass(frozen=True)
class StoredText:
    text: str
    file_name: str


class PolicyRegistry(Protocol):
    """The registry contract (see the module docstring); every method raises StoreUnavailable on an outage."""

    async def enforcing(self) -> dict[str, Enforcing]: ...

    async def change_enforcing(self, new: Enforcing, expected: str | None, audit: PolicyAudit) -> bool:
        """Set ``new`` if the pointer's version is still ``expected`` (None: no pointer yet), with ``audit`` in
        the history and the outbox, atomically. False (nothing written) when someone changed it first."""
        ...

    async def put_text(self, policy_id: str, version: str, text: str, file_name: str) -> None: ...

    async def text(self, policy_id: str, version: str) -> StoredText | None: ...

    async def shadows(self) -> list[ShadowRegistration]: ...

    async def set_shadow(self, registration: ShadowRegistration, audit: PolicyAudit) -> None: ...

    async def stop_shadow(self, policy_id: str, version: str, audit: PolicyAudit) -> bool: ...

    async def put_report(self, policy_id: str, version: str, kind: str, summary: dict[str, Any]) -> None: ...

    async def reports(self, policy_id: str, version: str) -> dict[str, dict[str, Any]]: ...

    async def history(self, policy_id: str) -> list[PolicyAudit]: ...

    async def record_audit(self, audit: PolicyAudit) -> None:
        """Append an entry that changes no pointer (a retroaction run's start and end) to history and outbox."""
        ...

    async def outbox(self) -> list[PolicyAudit]: ...

    async def published(self, audit_id: str) -> None: ...

    async def report_loaded(self, worker_id: str, loaded: dict[str, Any], now: float | None = None) -> None: ...

    async def loaded(self, max_age_s: float, now: float | None = None) -> dict[str, dict[str, Any]]: ...


def _shadow_field(policy_id: str, version: str) -> str:
    return f"{encode_part(policy_id)}:{encode_part(version)}"


def _registration(raw: str | bytes) -> ShadowRegistration:
    return ShadowRegistration(**json.loads(raw))


# ARGV: field (policy id), expected version ('' = no pointer), new pointer JSON, audit JSON, audit id.
_CHANGE_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
local version = ''
if current then version = cjson.decode(current)['version'] end
if version ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('RPUSH', KEYS[2], ARGV[4])
redis.call('HSET', KEYS[3], ARGV[5], ARGV[4])
return 1
"""


class RedisPolicyRegistry:
    """The registry under the store's key prefix, every key from :mod:`pipeline.store.keys`.

    ``store`` is a :class:`pipeline.store.redis.RedisStore` (its client, keys and outage mapping)."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self._redis = store.redis
        self._change = self._redis.register_script(_CHANGE_SCRIPT)

    def _key(self, namespace: Namespace, *parts: object) -> str:
        return self._store.key(namespace, *parts)

    async def _call(self, awaitable):  # type: ignore[no-untyped-def]
        return await self._store.guard(awaitable)

    async def enforcing(self) -> dict[str, Enforcing]:
        raw = await self._call(self._redis.hgetall(self._key(Namespace.POLICY_ENFORCING)))
        return {k.decode(): Enforcing.from_json(v) for k, v in raw.items()}

    async def change_enforcing(self, new: Enforcing, expected: str | None, audit: PolicyAudit) -> bool:
        payload = audit.model_dump_json()
        done = await self._call(self._change(
            keys=[self._key(Namespace.POLICY_ENFORCING), self._key(Namespace.POLICY_HISTORY, new.policy_id),
                  self._key(Namespace.POLICY_OUTBOX)],
            args=[new.policy_id, expected or "", new.to_json(), payload, audit.audit_id],
        ))
        return bool(int(done))

    async def put_text(self, policy_id: str, version: str, text: str, file_name: str) -> None:
        await self._call(self._redis.set(self._key(Namespace.POLICY_TEXT, policy_id, version),
                                         json.dumps({"text": text, "file_name": file_name})))

    async def text(self, policy_id: str, version: str) -> StoredText | None:
        raw = await self._call(self._redis.get(self._key(Namespace.POLICY_TEXT, policy_id, version)))
        return StoredText(**json.loads(raw)) if raw is not None else None

    async def shadows(self) -> list[ShadowRegistration]:
        raw = await self._call(self._redis.hgetall(self._key(Namespace.POLICY_SHADOW)))
        return sorted((_registration(v) for v in raw.values()), key=lambda r: (r.policy_id, r.started_at))

    async def _with_audit(self, audit: PolicyAudit, change: Callable[[Any], None]) -> list[Any]:
        payload = audit.model_dump_json()
        pipe = self._redis.pipeline(transaction=True)
        change(pipe)
        pipe.rpush(self._key(Namespace.POLICY_HISTORY, audit.policy_id), payload)
        pipe.hset(self._key(Namespace.POLICY_OUTBOX), audit.audit_id, payload)
        return await self._call(pipe.execute())

    async def set_shadow(self, registration: ShadowRegistration, audit: PolicyAudit) -> None:
        field_ = _shadow_field(registration.policy_id, registration.version)
        await self._with_audit(audit, lambda pipe: pipe.hset(self._key(Namespace.POLICY_SHADOW), field_,
                                                             json.dumps(asdict(registration))))

    async def stop_shadow(self, policy_id: str, version: str, audit: PolicyAudit) -> bool:
        key, field_ = self._key(Namespace.POLICY_SHADOW), _shadow_field(policy_id, version)
        if not await self._call(self._redis.hexists(key, field_)):
            return False
        results = await self._with_audit(audit, lambda pipe: pipe.hdel(key, field_))
        return bool(results[0])

    async def put_report(self, policy_id: str, version: str, kind: str, summary: dict[str, Any]) -> None:
        await self._call(self._redis.hset(self._key(Namespace.POLICY_REPORTS, policy_id, version), kind,
                                          json.dumps(summary, sort_keys=True)))

    async def reports(self, policy_id: str, version: str) -> dict[str, dict[str, Any]]:
        raw = await self._call(self._redis.hgetall(self._key(Namespace.POLICY_REPORTS, policy_id, version)))
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    async def history(self, policy_id: str) -> list[PolicyAudit]:
        raw = await self._call(self._redis.lrange(self._key(Namespace.POLICY_HISTORY, policy_id), 0, -1))
        return [PolicyAudit.model_validate_json(r) for r in raw]

    async def record_audit(self, audit: PolicyAudit) -> None:
        await self._with_audit(audit, lambda pipe: None)

    async def outbox(self) -> list[PolicyAudit]:
        raw = await self._call(self._redis.hgetall(self._key(Namespace.POLICY_OUTBOX)))
        return sorted((PolicyAudit.model_validate_json(v) for v in raw.values()), key=lambda a: a.occurred_at)

    async def published(self, audit_id: str) -> None:
        await self._call(self._redis.hdel(self._key(Namespace.POLICY_OUTBOX), audit_id))

    async def report_loaded(self, worker_id: str, loaded: dict[str, Any], now: float | None = None) -> None:
        pipe = self._redis.pipeline(transaction=True)
        pipe.zadd(self._key(Namespace.POLICY_WORKERS), {worker_id: now if now is not None else time.time()})
        pipe.hset(self._key(Namespace.POLICY_LOADED), worker_id, json.dumps(loaded, sort_keys=True))
        await self._call(pipe.execute())

    async def loaded(self, max_age_s: float, now: float | None = None) -> dict[str, dict[str, Any]]:
        now = now if now is not None else time.time()
        workers_key, loaded_key = self._key(Namespace.POLICY_WORKERS), self._key(Namespace.POLICY_LOADED)
        gone = await self._call(self._redis.zrangebyscore(workers_key, "-inf", now - max_age_s))
        if gone:  # workers that stopped reporting: forget them (a stopped worker enforces nothing)
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(workers_key, *gone)
            pipe.hdel(loaded_key, *gone)
            await self._call(pipe.execute())
        live = await self._call(self._redis.zrangebyscore(workers_key, now - max_age_s, "+inf"))
        if not live:
            return {}
        values = await self._call(self._redis.hmget(loaded_key, live))
        return {w.decode(): json.loads(v) for w, v in zip(live, values) if v is not None}


@dataclass
class InMemoryPolicyRegistry:
    """The registry contract in dicts, imitating :class:`RedisPolicyRegistry` (its script and transactions are the
    reference): compare-and-set on the pointer's version with the audit entry in the same step, shadow changes
    with their audit entries, reports by kind, workers forgotten once they stop reporting. ``available = False``
    makes every call raise StoreUnavailable, as a Redis outage does."""

    available: bool = True
    pointers: dict[str, Enforcing] = field(default_factory=dict)
    texts: dict[tuple[str, str], StoredText] = field(default_factory=dict)
    shadow_table: dict[tuple[str, str], ShadowRegistration] = field(default_factory=dict)
    report_table: dict[tuple[str, str], dict[str, dict[str, Any]]] = field(default_factory=dict)
    histories: dict[str, list[PolicyAudit]] = field(default_factory=dict)
    outbox_table: dict[str, PolicyAudit] = field(default_factory=dict)
    workers: dict[str, tuple[float, dict[str, Any]]] = field(default_factory=dict)

    def _check(self) -> None:
        if not self.available:
            raise StoreUnavailable("in-memory policy registry marked unavailable")

    def _audit(self, audit: PolicyAudit) -> None:
        # A round trip through JSON, as Redis stores it: what comes back is what was written, not the object.
        copy = PolicyAudit.model_validate_json(audit.model_dump_json())
        self.histories.setdefault(audit.policy_id, []).append(copy)
        self.outbox_table[audit.audit_id] = copy

    async def enforcing(self) -> dict[str, Enforcing]:
        self._check()
        return dict(self.pointers)

    async def change_enforcing(self, new: Enforcing, expected: str | None, audit: PolicyAudit) -> bool:
        self._check()
        current = self.pointers.get(new.policy_id)
        if (current.version if current is not None else "") != (expected or ""):
            return False
        self.pointers[new.policy_id] = Enforcing.from_json(new.to_json())
        self._audit(audit)
        return True

    async def put_text(self, policy_id: str, version: str, text: str, file_name: str) -> None:
        self._check()
        self.texts[(policy_id, version)] = StoredText(text, file_name)

    async def text(self, policy_id: str, version: str) -> StoredText | None:
        self._check()
        return self.texts.get((policy_id, version))

    async def shadows(self) -> list[ShadowRegistration]:
        self._check()
        return sorted(self.shadow_table.values(), key=lambda r: (r.policy_id, r.started_at))

    async def set_shadow(self, registration: ShadowRegistration, audit: PolicyAudit) -> None:
        self._check()
        self.shadow_table[(registration.policy_id, registration.version)] = registration
        self._audit(audit)

    async def stop_shadow(self, policy_id: str, version: str, audit: PolicyAudit) -> bool:
        self._check()
        if self.shadow_table.pop((policy_id, version), None) is None:
            return False
        self._audit(audit)
        return True

    async def put_report(self, policy_id: str, version: str, kind: str, summary: dict[str, Any]) -> None:
        self._check()
        self.report_table.setdefault((policy_id, version), {})[kind] = json.loads(json.dumps(summary, sort_keys=True))

    async def reports(self, policy_id: str, version: str) -> dict[str, dict[str, Any]]:
        self._check()
        return dict(self.report_table.get((policy_id, version), {}))

    async def history(self, policy_id: str) -> list[PolicyAudit]:
        self._check()
        return list(self.histories.get(policy_id, []))

    async def record_audit(self, audit: PolicyAudit) -> None:
        self._check()
        self._audit(audit)

    async def outbox(self) -> list[PolicyAudit]:
        self._check()
        return sorted(self.outbox_table.values(), key=lambda a: a.occurred_at)

    async def published(self, audit_id: str) -> None:
        self._check()
        self.outbox_table.pop(audit_id, None)

    async def report_loaded(self, worker_id: str, loaded: dict[str, Any], now: float | None = None) -> None:
        self._check()
        self.workers[worker_id] = (now if now is not None else time.time(), json.loads(json.dumps(loaded)))

    async def loaded(self, max_age_s: float, now: float | None = None) -> dict[str, dict[str, Any]]:
        self._check()
        now = now if now is not None else time.time()
        for worker in [w for w, (seen, _) in self.workers.items() if seen <= now - max_age_s]:
            del self.workers[worker]
        return {w: v for w, (_, v) in self.workers.items()}
