"""Lifecycle actions on the registry: shadow a version, promote it, roll back; every one audited.

A promotion is gated. The candidate must

1. lint without errors (what would break the prompt);
2. pass the policy's golden set at the policy's bar (``[lifecycle] min_golden_accuracy`` in its metadata, else
   ``lifecycle.min_golden_accuracy``), run fresh against the reasoner that will enforce it; and
3. have a backtest or shadow report in the registry that compared it with enforcement on at least one item.

Then, in one atomic step on the registry, the pointer moves (compare-and-set on the version the promoter saw, so
a concurrent promotion makes this one fail rather than silently win) and the audit entry is written to the
history and the outbox; the entry is then published to ``moderation.decisions`` (``PolicyAudit``, with who, why and
the evidence). The texts of the new and the old version are stored in the registry first, so every worker can
load either, and a rollback can always return. Workers pick the change up within ``lifecycle.refresh_s``;
``wait_for_fleet`` tells when every live worker reports the new version.

A rollback needs no gate (it returns to a version that enforced before) but is audited the same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pipeline.config import Settings
from pipeline.errors import PolicyError
from pipeline.lifecycle.live import resolve_text
from pipeline.lifecycle.registry import Enforcing, PolicyRegistry, ShadowRegistration
from pipeline.policies import Policy, PolicyLibrary
from pipeline.policies.lint import errors, lint_policy
from pipeline.policies.versions import find_version, load_version
from pipeline.schemas import PolicyAction, PolicyAudit

logger = logging.getLogger(__name__)

HISTORY_DEPTH = 20  # versions a pointer remembers for rollbacks
REPORT_KINDS = ("backtest", "shadow")


class LifecycleError(PolicyError):
    """A lifecycle action cannot be done as asked (unknown version, a failed gate, nothing to roll back to)."""


@dataclass(frozen=True)
class Gate:
    name: str
    passed: bool
    detail: str


class Lifecycle:
    """Lifecycle actions against one registry; audit entries go to ``sink`` (topic ``moderation.decisions``)."""

    def __init__(self, settings: Settings, registry: PolicyRegistry, sink: Any, library: PolicyLibrary,
                 store: Any = None) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.library = library  # the folder's policies, at their base versions
        self.store = store  # the StateStore the registry lives beside (retroaction writes its ledger)
        self.topic = settings.kafka.topic(settings.kafka.decisions_topic)

    # -- versions ---------------------------------------------------------------------------------------------

    async def enforcing(self, policy_id: str) -> tuple[Policy, Enforcing | None]:
        """The version of ``policy_id`` that enforces now, and its pointer (None: the base, never promoted)."""
        base = self.library.get(policy_id)
        pointer = (await self.registry.enforcing()).get(policy_id)
        if pointer is None or pointer.version == base.version:
            return base, pointer
        return await self.version(policy_id, pointer.version), pointer

    async def version(self, policy_id: str, spec: str) -> Policy:
        """The version ``spec`` names (a hash, a unique prefix, ``base``, a candidate's name; or a version only the
        registry holds, by its full hash), loaded with the policy's metadata."""
        base = self.library.get(policy_id)
        assert base.folder is not None
        found = find_version(base.folder, spec)
        if found is not None:
            return load_version(base.folder, found.text, found.path.name, self.settings.reasoner)
        stored = await resolve_text(self.registry, base, spec)
        if stored is None:
            raise LifecycleError(f"policy {policy_id} has no version {spec!r} (candidates are files in "
                                 f"{base.folder / 'candidates'}; `modpipe policy versions {policy_id}` lists them)")
        return load_version(base.folder, stored[0], stored[1], self.settings.reasoner)

    async def store_text(self, policy: Policy) -> None:
        await self.registry.put_text(policy.policy_id, policy.version, policy.text, policy.policy_file)

    # -- audit --------------------------------------------------------------------------------------------------

    def audit(self, action: PolicyAction, policy: Policy | str, version: str, actor: str, reason: str,
              **fields: Any) -> PolicyAudit:
        policy_id = policy if isinstance(policy, str) else policy.policy_id
        return PolicyAudit(audit_id=fields.pop("audit_id", None) or uuid.uuid4().hex, action=action,
                           policy_id=policy_id, version=version, actor_id=actor, reason=reason, **fields)

    async def flush_audit(self) -> int:
        """Publish what the outbox holds (this action's entries, and any a crash left); returns how many."""
        sent = 0
        for entry in await self.registry.outbox():
            await self.sink.send(self.topic, entry.content_id or entry.policy_id, entry.to_bytes())
            await self.registry.published(entry.audit_id)
            sent += 1
        return sent

    # -- shadow -------------------------------------------------------------------------------------------------

    async def shadow_start(self, policy_id: str, spec: str, actor: str, reason: str,
                           sample: float | None = None) -> Policy:
        candidate = await self.version(policy_id, spec)
        self._check_lint(candidate)
        current, _ = await self.enforcing(policy_id)
        if candidate.version == current.version and current.enforcing:
            raise LifecycleError(f"{policy_id} {candidate.version} is the enforcing version: nothing to compare")
        await self.store_text(candidate)
        registration = ShadowRegistration(policy_id, candidate.version, sample, time.time(), actor)
        await self.registry.set_shadow(registration, self.audit(
            PolicyAction.SHADOW_START, candidate, candidate.version, actor, reason, previous_version=current.version,
            evidence={"sample": sample if sample is not None else self.settings.lifecycle.shadow_sample}))
        await self.flush_audit()
        return candidate

    async def shadow_stop(self, policy_id: str, spec: str, actor: str, reason: str) -> bool:
        version = (await self.version(policy_id, spec)).version
        stopped = await self.registry.stop_shadow(policy_id, version, self.audit(
            PolicyAction.SHADOW_STOP, policy_id, version, actor, reason))
        await self.flush_audit()
        return stopped

    # -- promotion ----------------------------------------------------------------------------------------------

    def bar(self, policy: Policy) -> float:
        return policy.golden_bar if policy.golden_bar is not None else self.settings.lifecycle.min_golden_accuracy

    def _check_lint(self, policy: Policy) -> None:
        problems = errors(lint_policy(policy))
        if problems:
            raise LifecycleError(f"{policy.policy_id} {policy.version} does not lint: "
                                 + "; ".join(map(str, problems)))

    async def gates(self, candidate: Policy, golden: dict[str, Any] | None) -> list[Gate]:
        """Whether ``candidate`` may be promoted; ``golden`` is its golden-set report (pipeline.policies.golden)."""
        problems = errors(lint_policy(candidate))
        out = [Gate("lint", not problems, "; ".join(map(str, problems)) or "no errors")]
        bar = self.bar(candidate)
        if golden is None:
            out.append(Gate("golden", False, "no golden-set run"))
        else:
            ok = golden["version"] == candidate.version and golden["rows"] > 0 and golden["accuracy"] >= bar
            out.append(Gate("golden", ok, f"accuracy {golden['accuracy']:.3f} on {golden['rows']} rows with "
                                          f"{golden.get('model', '?')} (bar {bar:.3f})"))
        reports = await self.registry.reports(candidate.policy_id, candidate.version)
        usable = {k: r for k, r in reports.items() if k in REPORT_KINDS and (r.get("compared") or 0) > 0}
        detail = ", ".join(f"{k}: {r['compared']} compared, agreement {r.get('agreement')}" for k, r in usable.items())
        out.append(Gate("report", bool(usable), detail or "no backtest or shadow report compared it with "
                        "enforcement (run `modpipe policy backtest` or shadow it and run `shadow-report`)"))
        return out

    async def promote(self, policy_id: str, spec: str, actor: str, reason: str,
                      golden: dict[str, Any] | None) -> PolicyAudit:
        """Make the candidate enforcing if every gate passes (LifecycleError naming the failed gates otherwise)."""
        candidate = await self.version(policy_id, spec)
        current, pointer = await self.enforcing(policy_id)
        if candidate.version == current.version:
            raise LifecycleError(f"{policy_id} {candidate.version} already enforces")
        gates = await self.gates(candidate, golden)
        failed = [g for g in gates if not g.passed]
        if failed:
            raise LifecycleError("not promoted: " + "; ".join(f"{g.name}: {g.detail}" for g in failed))
        await self.store_text(current)
        await self.store_text(candidate)
        audit_id = uuid.uuid4().hex
        previous = ((current.version,) + (pointer.previous if pointer else ()))[:HISTORY_DEPTH]
        new = Enforcing(policy_id, candidate.version, previous, time.time(), audit_id, actor)
        reports = await self.registry.reports(policy_id, candidate.version)
        evidence: dict[str, Any] = {
            "golden_accuracy": golden["accuracy"] if golden else None,
            "golden_rows": golden["rows"] if golden else None,
            "golden_model": golden.get("model") if golden else None,
            "golden_bar": self.bar(candidate),
        }
        for kind in REPORT_KINDS:
            if kind in reports:
                evidence[f"{kind}_compared"] = reports[kind].get("compared")
                evidence[f"{kind}_agreement"] = reports[kind].get("agreement")
        entry = self.audit(PolicyAction.PROMOTE, candidate, candidate.version, actor, reason,
                           previous_version=current.version, evidence=evidence, audit_id=audit_id)
        if not await self.registry.change_enforcing(new, pointer.version if pointer else None, entry):
            raise LifecycleError(f"{policy_id}'s enforcing version changed while promoting; look again and retry")
        if any(r.policy_id == policy_id and r.version == candidate.version for r in await self.registry.shadows()):
            await self.registry.stop_shadow(policy_id, candidate.version, self.audit(
                PolicyAction.SHADOW_STOP, policy_id, candidate.version, actor, "promoted"))
        await self.flush_audit()
        logger.warning("policy %s promoted to %s (was %s) by %s", policy_id, candidate.version, current.version, actor)
        return entry

    async def rollback(self, policy_id: str, actor: str, reason: str) -> PolicyAudit:
        """Return to the version that enforced before the current one."""
        current, pointer = await self.enforcing(policy_id)
        if pointer is None or not pointer.previous:
            raise LifecycleError(f"{policy_id} was never promoted: nothing to roll back to")
        target = pointer.previous[0]
        await self.version(policy_id, target)  # LifecycleError if its text is gone everywhere
        audit_id = uuid.uuid4().hex
        new = Enforcing(policy_id, target, pointer.previous[1:], time.time(), audit_id, actor)
        entry = self.audit(PolicyAction.ROLLBACK, policy_id, target, actor, reason, previous_version=current.version,
                           audit_id=audit_id)
        if not await self.registry.change_enforcing(new, pointer.version, entry):
            raise LifecycleError(f"{policy_id}'s enforcing version changed while rolling back; look again and retry")
        await self.flush_audit()
        logger.warning("policy %s rolled back to %s (was %s) by %s", policy_id, target, current.version, actor)
        return entry

    async def wait_for_fleet(self, policy_id: str, version: str, timeout_s: float,
                             poll_s: float = 0.5) -> dict[str, str]:
        """Wait until every live worker reports enforcing ``version`` (or the timeout); returns worker -> version
        as last reported."""
        max_age = 3 * self.settings.lifecycle.refresh_s + 5
        deadline = time.monotonic() + timeout_s
        while True:
            loaded = await self.registry.loaded(max_age)
            seen = {w: str(v.get("enforcing", {}).get(policy_id, "")) for w, v in loaded.items()}
            if (seen and all(v == version for v in seen.values())) or time.monotonic() > deadline:
                return seen
            await asyncio.sleep(poll_s)
