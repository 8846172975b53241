"""What each worker role does with a message, as plain async code that tests without Kafka, Redis or Triton.

The Faust agents in :mod:`pipeline.app` only turn events into :class:`~pipeline.codec.Record`s and call these.
The handlers talk to protocols (a :class:`~pipeline.store.base.StateStore`, a
:class:`~pipeline.effects.MessageSink` inside :class:`~pipeline.effects.Effects`, and the :class:`TriageScorer`,
:class:`Judge` and :class:`ReviewInbox` below), whose real and in-memory implementations sit side by side.

Every handler obeys the same contract: it never raises. Each message ends as a published effect (verdict,
escalation, review task) or a dead letter; transient failures are retried with bounded backoff first.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol

from pipeline import metrics
from pipeline.codec import Record, decode_content_item, decode_model
from pipeline.effects import Effects, guarded, ingest_time, since_ingest_ms
from pipeline.errors import PermanentError, PolicyError
from pipeline.router import ReasoningRoute, TriageRoute, TriageThresholds, route_triage
from pipeline.schemas import (
    ContentItem,
    Decision,
    Escalation,
    Latency,
    PolicyRef,
    ReviewTask,
    Stage,
    TriageScores,
    Verdict,
)
from pipeline.store.base import EffectKind, StateStore, item_effect
from pipeline.texts import text_hash

if TYPE_CHECKING:
    from pipeline.policies import PolicyLibrary
    from pipeline.reasoner.core import ReasonerOutcome

logger = logging.getLogger(__name__)


class TriageScorer(Protocol):
    """The triage classifier as the handler sees it (:class:`pipeline.triage.TriageModel`)."""

    version: str
    thresholds: TriageThresholds

    def score(self, texts: list[str]) -> list[TriageScores]: ...


class Judge(Protocol):
    """The reasoner as the handler sees it (:class:`pipeline.reasoner.SafeguardReasoner`)."""

    async def judge(
        self, item: ContentItem, policy_ids: list[str], triage: TriageScores | None = None
    ) -> ReasonerOutcome: ...


class ReviewInbox(Protocol):
    """The reviewers' queue as the intake handler sees it (:class:`pipeline.review.queue.ReviewQueue`)."""

    async def enqueue(self, task: ReviewTask) -> bool: ...


def _policy_refs(library: PolicyLibrary, policy_ids: Sequence[str]) -> list[PolicyRef]:
    return [library.get(pid).ref() for pid in policy_ids]


class TriageHandler:
    """content.incoming -> final verdict (confident) or provisional verdict + escalation."""

    stage = Stage.TRIAGE.value

    def __init__(
        self,
        model: TriageScorer,
        library: PolicyLibrary,
        effects: Effects,
        *,
        max_text_chars: int,
        executor: Executor | None = None,
    ) -> None:
        self.model = model
        self.library = library
        self.effects = effects
        self.max_text_chars = max_text_chars
        self.executor = executor
        self.enforcing = library.enforcing_ids()
        self.default_policies = library.default_ids()

    async def handle_batch(self, records: Sequence[Record]) -> None:
        decoded: list[tuple[Record, ContentItem]] = []
        for record in records:
            try:
                decoded.append((record, decode_content_item(record.value, self.max_text_chars)))
            except PermanentError as exc:
                metrics.messages_total.labels(self.stage, "bad_input").inc()
                await self.effects.dead_letter(record, self.stage, exc)
        if not decoded:
            return
        try:
            scores = await asyncio.get_running_loop().run_in_executor(
                self.executor, self.model.score, [item.text for _, item in decoded]
            )
        except Exception as exc:  # noqa: BLE001 - a scoring failure must not lose the batch
            logger.exception("triage: scoring a batch of %d failed", len(decoded))
            for record, _ in decoded:
                await self.effects.dead_letter(record, self.stage, exc)
            return
        metrics.triage_batch_size.observe(len(decoded))
        if scores:
            metrics.triage_latency_seconds.observe(scores[0].latency_ms / 1000.0)
        await asyncio.gather(
            *(
                guarded(self.effects, record, self.stage, lambda r=record, i=item, s=score: self._decide(r, i, s))
                for (record, item), score in zip(decoded, scores, strict=True)
            )
        )

    async def _decide(self, record: Record, item: ContentItem, scores: TriageScores) -> None:
        cid = item.content_id
        # An edit (the same id with another text) is a new revision, moderated like new content.
        revision = await self.effects.ledger(
            self.stage, lambda: self.effects.store.revision(cid, text_hash(item.text), record.message_id)
        )
        slot = item_effect(cid, revision.number)
        # A redelivered or replayed message whose effects exist: finish publishing them, decide nothing new.
        if await self.effects.finish_pending(EffectKind.FINAL, slot, cid):
            return
        if await self.effects.finish_pending(EffectKind.ESCALATION, slot, cid):
            await self.effects.finish_pending(EffectKind.PROVISIONAL, slot, cid)
            return
        if item.policy_ids:
            enforcing = [p for p in item.policy_ids if p in self.enforcing]
            if not enforcing:
                raise PolicyError(f"none of the requested policies {item.policy_ids} is enforcing")
        else:
            enforcing = self.default_policies
        decision = route_triage(scores, self.model.thresholds, enforcing)
        ingested = ingest_time(record)
        latency = Latency(triage_ms=scores.latency_ms, since_ingest_ms=since_ingest_ms(ingested))
        policies = _policy_refs(self.library, decision.policy_ids)
        supersedes = await self.effects.superseded(cid, revision.number)
        if decision.route is TriageRoute.ESCALATE:
            assert decision.reason is not None
            provisional = Verdict.provisional(
                cid, Stage.TRIAGE, revision=revision.number, supersedes=supersedes, platform=item.platform,
                triage=scores, policies=policies,
                latency=latency, rationale=f"hidden pending policy review ({decision.reason.value})",
            )
            # Hide first: the item must be hidden before anyone can learn it was escalated.
            await self.effects.verdict(provisional)
            escalation = Escalation(
                item=item,
                revision=revision.number,
                triage=scores,
                reason=decision.reason,
                policy_ids=list(decision.policy_ids),
                ingested_at=ingested,
            )
            if await self.effects.emit(EffectKind.ESCALATION, slot, cid, escalation.to_bytes()):
                metrics.escalations_total.labels(decision.reason.value).inc()
            logger.info("triage: %s %s r%d escalated (%s)", record.where, cid, revision.number,
                        decision.reason.value)
            return
        blocked = decision.route is TriageRoute.BLOCK
        thresholds = self.model.thresholds
        comparison = f">= {thresholds.block_above:.3f}" if blocked else f"< {thresholds.allow_below:.3f}"
        final = Verdict.final(
            cid, Decision.BLOCK if blocked else Decision.ALLOW, Stage.TRIAGE,
            revision=revision.number, supersedes=supersedes, platform=item.platform, triage=scores,
            policies=policies if blocked else [],
            latency=latency, rationale=f"triage classifier: violation probability {scores.violation:.3f} {comparison}",
        )
        await self.effects.verdict(final)
        logger.info("triage: %s %s r%d %s", record.where, cid, revision.number, final.decision.value)


class ReasoningHandler:
    """moderation.escalations -> final verdict from the reasoning model, or a review task (fail closed)."""

    stage = "reasoning"

    def __init__(self, reasoner: Judge, library: PolicyLibrary, effects: Effects) -> None:
        self.reasoner = reasoner
        self.library = library
        self.effects = effects

    async def handle_batch(self, records: Sequence[Record]) -> None:
        """Judge a batch concurrently (many generate calls in flight); each record is guarded on its own."""
        await asyncio.gather(*(self.handle(record) for record in records))

    async def handle(self, record: Record) -> None:
        await guarded(self.effects, record, self.stage, lambda: self._handle(record))

    async def _handle(self, record: Record) -> None:
        escalation = decode_model(record.value, Escalation)
        item = escalation.item
        cid = item.content_id
        slot = item_effect(cid, escalation.revision)
        if await self.effects.finish_pending(EffectKind.FINAL, slot, cid):
            return
        if await self.effects.finish_pending(EffectKind.REVIEW, slot, cid):
            return
        for policy_id in escalation.policy_ids:
            self.library.get(policy_id)  # PolicyError (dead letter, item stays hidden) for an unknown policy
        outcome = await self.reasoner.judge(item, escalation.policy_ids, triage=escalation.triage)
        latency = Latency(
            triage_ms=escalation.triage.latency_ms,
            reasoner_ms=outcome.latency_ms,
            since_ingest_ms=since_ingest_ms(escalation.ingested_at),
        )
        if outcome.route in (ReasoningRoute.ALLOW, ReasoningRoute.BLOCK):
            blocked = outcome.route is ReasoningRoute.BLOCK
            final = Verdict.final(
                cid, Decision.BLOCK if blocked else Decision.ALLOW, Stage.REASONER, revision=escalation.revision,
                supersedes=await self.effects.superseded(cid, escalation.revision), platform=item.platform,
                triage=escalation.triage, policies=outcome.policies, reasoner_calls=outcome.calls,
                rule_ids=outcome.rule_ids, rationale=outcome.rationale, latency=latency,
            )
            await self.effects.verdict(final)
            # Triage hid the item just before escalating it: escalated_at is when the hide began.
            metrics.time_hidden_seconds.labels(Stage.REASONER.value).observe(
                max(0.0, (final.decided_at - escalation.escalated_at).total_seconds())
            )
            logger.info("reasoning: %s %s %s (effort %s)", record.where, cid, final.decision.value,
                        outcome.effort.value)
            return
        assert outcome.review_reason is not None
        task = ReviewTask(
            task_id=uuid.uuid4().hex,
            item=item,
            revision=escalation.revision,
            triage=escalation.triage,
            reason=outcome.review_reason,
            policy_ids=escalation.policy_ids,
            reasoner_calls=outcome.calls,
            ingested_at=escalation.ingested_at,
        )
        if await self.effects.emit(EffectKind.REVIEW, slot, cid, task.to_bytes()):
            metrics.review_tasks_total.labels(outcome.review_reason.value).inc()
        logger.info("reasoning: %s %s to review (%s)", record.where, cid, outcome.review_reason.value)


class ReviewIntakeHandler:
    """moderation.review -> the reviewers' queue (oldest first, one task per item)."""

    stage = "review_intake"

    def __init__(self, store: StateStore, inbox: ReviewInbox, effects: Effects) -> None:
        self.store = store
        self.inbox = inbox
        self.effects = effects

    async def handle_batch(self, records: Sequence[Record]) -> None:
        """In order: a redelivered task arrives after the one it repeats."""
        for record in records:
            await self.handle(record)

    async def handle(self, record: Record) -> None:
        await guarded(self.effects, record, self.stage, lambda: self._handle(record))

    async def _handle(self, record: Record) -> None:
        task = decode_model(record.value, ReviewTask)

        async def enqueue() -> bool:
            # An item decided meanwhile (or a replayed task) must not come back to the reviewers.
            decided = await self.store.recorded(EffectKind.FINAL, item_effect(task.item.content_id, task.revision))
            if decided is not None:
                return False
            return await self.inbox.enqueue(task)

        added = await self.effects.ledger(self.stage, enqueue)
        logger.info("review intake: %s %s %s", record.where, task.item.content_id,
                    "queued" if added else "already known")
