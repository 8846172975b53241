"""``modpipe policy retroact``: re-judge what older versions of a policy decided, and supersede what changed.

Which items: those with a final verdict on ``moderation.verdicts`` since ``--since`` whose *standing* verdict (the
one visibility points at) was decided by the reasoner under another version of the policy than the one enforcing
now. The text comes from the item's escalation (``moderation.escalations``, read from ``lifecycle.
retro_lookback_s`` before ``--since``). Never touched: an item a reviewer decided (a machine never overwrites a
person: ``skipped_reviewed``), an item with a review task open or being decided (an appeal: ``skipped_in_review``),
an item whose standing verdict changed under the run (``skipped_superseded``).

Each item is re-judged against the policies its escalation asked for, at their enforcing versions (the others'
answers mostly come from the verdict cache). When the decision changes, a superseding final verdict is published:
``supersedes`` names the standing verdict, visibility moves only over it (the compare-and-set appeals use), and
the verdict is recorded first in a ledger slot of its own (:func:`~pipeline.store.base.retro_effect`: item,
revision, policy and enforcing version), so it never takes the slot of the item's original verdict and a second
run finds it. When the decision is the same, nothing is published to platforms (``unchanged``); when the enforcing
version would send the item to people, the standing verdict stays (``unsettled``; reviewers would not get a task
for an item already decided). Every item's outcome is an audit entry (:class:`~pipeline.schemas.PolicyAudit`,
``retroact_item``) recorded in the same slot, so running the same retroaction twice publishes each superseding
verdict and each entry once; the run itself is audited at its start and end.

A budget bounds the model calls a run may spend (cached answers are free); a run that reaches it stops starting
items and says how many are left: run it again to continue.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pipeline import metrics
from pipeline.config import Settings
from pipeline.lifecycle.history import Verdicts, escalations_by_item, read_all
from pipeline.lifecycle.promote import Lifecycle
from pipeline.lifecycle.shadow import model_calls, outcome_decision
from pipeline.policies import Policy
from pipeline.schemas import (
    Escalation,
    Latency,
    PolicyAction,
    PolicyAudit,
    ReviewReason,
    Stage,
    Verdict,
    VerdictStatus,
    parse_wire,
)
from pipeline.store.base import EffectKind, StateStore, retro_effect

logger = logging.getLogger(__name__)

TERMINAL = ("published", "unchanged", "unsettled")  # recorded in the item's slot: a rerun does nothing more


@dataclass(frozen=True)
class Target:
    """An item revision to re-judge: its standing verdict and its escalation (text, triage, policies)."""

    content_id: str
    revision: int
    standing: Verdict
    escalation: Escalation
    old_version: str


@dataclass
class Found:
    targets: list[Target] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # why items with a verdict in the window were left out


def retro_audit_id(content_id: str, revision: int, policy_id: str, version: str, outcome: str = "",
                   standing: str = "") -> str:
    """The audit id of an item's retroaction entry: the same in every run (skips name the verdict they saw)."""
    raw = f"retro|{content_id}|{revision}|{policy_id}|{version}|{outcome}|{standing}"
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Retroaction:
    """One retroaction run of ``policy`` (the enforcing version) over items decided by its older versions."""

    def __init__(self, settings: Settings, store: StateStore, sink: Any, lifecycle: Lifecycle, reasoner: Any,
                 policy: Policy, *, actor: str, reason: str,
                 in_review: Callable[[str], Awaitable[bool]] | None = None, run_id: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.sink = sink
        self.lifecycle = lifecycle
        self.reasoner = reasoner
        self.policy = policy
        self.actor = actor
        self.reason = reason
        self.in_review = in_review
        self.run_id = run_id or uuid.uuid4().hex[:16]
        self.verdicts_topic = settings.kafka.topic(settings.kafka.verdicts_topic)
        self.decisions_topic = settings.kafka.topic(settings.kafka.decisions_topic)
        self.spent = 0

    # -- which items ------------------------------------------------------------------------------------------

    async def find(self, since: datetime, until: datetime | None = None) -> Found:
        kafka = self.settings.kafka
        verdicts = Verdicts.from_records(await read_all(kafka, kafka.topic(kafka.verdicts_topic), since, until))
        lookback = since - timedelta(seconds=self.settings.lifecycle.retro_lookback_s)
        escalations = escalations_by_item(await read_all(kafka, kafka.topic(kafka.escalations_topic), lookback))
        return await self.select(verdicts, escalations)

    async def select(self, verdicts: Verdicts, escalations: dict[tuple[str, int], Escalation]) -> Found:
        found = Found()
        pid, version = self.policy.policy_id, self.policy.version
        for cid in sorted({cid for cid, _ in verdicts.items()}):
            record = await self.store.visibility(cid)
            standing = record.verdict
            if standing is None or standing.status is not VerdictStatus.FINAL:
                found.skipped["not_final"] += 1
                continue
            if standing.stage is Stage.REVIEW:
                found.skipped["skipped_reviewed"] += 1
                continue
            if standing.stage is not Stage.REASONER:
                found.skipped["decided_by_triage"] += 1
                continue
            ref = next((p for p in standing.policies if p.policy_id == pid), None)
            if ref is None:
                found.skipped["policy_not_judged"] += 1
                continue
            if ref.version == version:
                found.skipped["already_this_version"] += 1
                continue
            escalation = escalations.get((cid, standing.revision))
            if escalation is None:
                found.skipped["no_escalation_text"] += 1
                continue
            found.targets.append(Target(cid, standing.revision, standing, escalation, ref.version))
        return found

    # -- the run ----------------------------------------------------------------------------------------------

    def _audit(self, target: Target, outcome: str, **fields: Any) -> PolicyAudit:
        terminal = outcome in TERMINAL
        return PolicyAudit(
            audit_id=retro_audit_id(target.content_id, target.revision, self.policy.policy_id, self.policy.version,
                                    "" if terminal else outcome, "" if terminal else target.standing.verdict_id),
            action=PolicyAction.RETROACT_ITEM, policy_id=self.policy.policy_id, version=self.policy.version,
            previous_version=target.old_version, actor_id=self.actor, reason=self.reason, run_id=self.run_id,
            content_id=target.content_id, revision=target.revision, outcome=outcome,
            previous_decision=target.standing.decision, supersedes=target.standing.verdict_id, **fields)

    async def _publish_audit(self, slot: tuple[str, ...], entry: PolicyAudit) -> None:
        """Record the item's terminal entry in its slot (first record wins), publish the stored one, mark it."""
        recorded = await self.store.record(EffectKind.AUDIT, slot, entry.to_bytes())
        if not recorded.published:
            await self.sink.send(self.decisions_topic, entry.content_id, recorded.payload)
            await self.store.mark_published(EffectKind.AUDIT, slot)

    async def _publish_verdict(self, slot: tuple[str, ...], verdict: Verdict) -> bool:
        """Move visibility over the verdict it supersedes, then publish it; False (not published) when the standing
        verdict is no longer the one it supersedes."""
        assert verdict.supersedes is not None
        if not await self.store.visibility_after_appeal(verdict.content_id, verdict, verdict.supersedes):
            return False
        recorded = await self.store.recorded(EffectKind.FINAL, slot)
        if recorded is not None and not recorded.published:
            await self.sink.send(self.verdicts_topic, verdict.content_id, recorded.payload)
            await self.store.mark_published(EffectKind.FINAL, slot)
            metrics.verdicts_total.labels(Stage.REASONER.value, VerdictStatus.FINAL.value, verdict.decision.value).inc()
        return True

    async def _skip(self, target: Target, outcome: str) -> str:
        entry = self._audit(target, outcome)
        await self.sink.send(self.decisions_topic, target.content_id, entry.to_bytes())
        return outcome

    async def one(self, target: Target) -> str:
        """Re-judge one item; returns its outcome (see the module docstring)."""
        slot = retro_effect(target.content_id, target.revision, self.policy.policy_id, self.policy.version)
        done = await self.store.recorded(EffectKind.AUDIT, slot)
        if done is not None:
            entry = PolicyAudit.model_validate_json(done.payload)
            if entry.outcome == "published":  # finish what a crash may have left half done
                stored = await self.store.recorded(EffectKind.FINAL, slot)
                if stored is not None and not stored.published:
                    await self._publish_verdict(slot, parse_wire(Verdict, stored.payload))
            if not done.published:
                await self.sink.send(self.decisions_topic, target.content_id, done.payload)
                await self.store.mark_published(EffectKind.AUDIT, slot)
            return "already"
        stored = await self.store.recorded(EffectKind.FINAL, slot)
        if stored is not None:  # decided by an earlier run that stopped before publishing
            verdict = parse_wire(Verdict, stored.payload)
        else:
            current = (await self.store.visibility(target.content_id)).verdict
            if current is None or current.verdict_id != target.standing.verdict_id:
                return await self._skip(target, "skipped_superseded")
            if self.in_review is not None and await self.in_review(target.content_id):
                return await self._skip(target, "skipped_in_review")
            escalation = target.escalation
            outcome = await self.reasoner.judge(escalation.item, escalation.policy_ids, triage=escalation.triage)
            self.spent += model_calls(outcome.calls)
            decision = outcome_decision(outcome.route)
            evidence = {"model_calls": model_calls(outcome.calls), "route": outcome.route.value}
            if decision is None:
                if outcome.review_reason is ReviewReason.REASONER_FAILED:
                    return await self._skip(target, "failed")  # not recorded: the next run tries again
                await self._publish_audit(slot, self._audit(target, "unsettled", evidence=evidence))
                return "unsettled"
            if decision is target.standing.decision:
                await self._publish_audit(slot, self._audit(target, "unchanged", decision=decision,
                                                            evidence=evidence))
                return "unchanged"
            new = Verdict.final(
                target.content_id, decision, Stage.REASONER, revision=target.revision,
                supersedes=target.standing.verdict_id, platform=target.standing.platform,
                triage=escalation.triage, policies=outcome.policies, reasoner_calls=outcome.calls,
                rule_ids=outcome.rule_ids, latency=Latency(triage_ms=escalation.triage.latency_ms,
                                                           reasoner_ms=outcome.latency_ms),
                rationale=f"retroaction: re-judged under {self.policy.policy_id} {self.policy.version} (was "
                f"{target.old_version}): {outcome.rationale}",
            )
            recorded = await self.store.record(EffectKind.FINAL, slot, new.to_bytes())
            verdict = parse_wire(Verdict, recorded.payload)
        if not await self._publish_verdict(slot, verdict):
            return await self._skip(target, "skipped_superseded")
        await self._publish_audit(slot, self._audit(target, "published", decision=verdict.decision,
                                                    verdict_id=verdict.verdict_id))
        return "published"

    async def run(self, targets: list[Target], *, budget: int | None = None, concurrency: int = 4,
                  on_item: Callable[[str], None] | None = None, since: datetime | None = None) -> dict[str, Any]:
        """Re-judge ``targets`` (at most ``concurrency`` at once, stopping before ``budget`` model calls);
        audited at the start and the end. Returns the counts."""
        pid, version = self.policy.policy_id, self.policy.version
        await self.lifecycle.registry.record_audit(self.lifecycle.audit(
            PolicyAction.RETROACT_START, pid, version, self.actor, self.reason, run_id=self.run_id,
            evidence={"items": len(targets), "budget": budget, "since": since.isoformat() if since else None}))
        await self.lifecycle.flush_audit()
        counts: Counter[str] = Counter()
        gate = asyncio.Semaphore(concurrency)
        reserve = {"calls": 0}
        worst = 2 * max((len(t.escalation.policy_ids) for t in targets), default=1)

        async def each(target: Target) -> None:
            async with gate:
                if budget is not None and self.spent + reserve["calls"] + worst > budget:
                    counts["left_for_budget"] += 1
                    return
                reserve["calls"] += worst
                try:
                    outcome = await self.one(target)
                except Exception as exc:  # noqa: BLE001 - one item's failure is counted; the run goes on
                    logger.warning("retroaction of %s r%d failed: %s: %s", target.content_id, target.revision,
                                   type(exc).__name__, exc)
                    outcome = "failed"
                finally:
                    reserve["calls"] -= worst
                counts[outcome] += 1
                metrics.retroaction_items_total.labels(pid, outcome).inc()
                if on_item is not None:
                    on_item(outcome)

        await asyncio.gather(*(each(t) for t in targets))
        result = {"run_id": self.run_id, "policy": pid, "version": version, "items": len(targets),
                  "model_calls": self.spent, **dict(sorted(counts.items()))}
        await self.lifecycle.registry.record_audit(self.lifecycle.audit(
            PolicyAction.RETROACT_END, pid, version, self.actor, self.reason, run_id=self.run_id,
            evidence={k: v for k, v in result.items() if isinstance(v, (int, float, str))}))
        await self.lifecycle.flush_audit()
        return result

