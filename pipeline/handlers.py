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
from pipeline.effects import Effects, guarded, ingest_time, outage_of, since_ingest_ms
from pipeline.errors import PermanentError, PolicyError
from pipeline.router import ReasoningRoute, TriageDecision, TriageRoute, TriageThresholds, route_triage
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


class ShadowHook(Protocol):
    """Live shadow judgements as the reasoning handler sees them (:class:`pipeline.lifecycle.shadow.ShadowRunner`):
    offered each judged item after its outcome is published; never waits, never raises."""

    def offer(self, escalation: Escalation, outcome: ReasonerOutcome, verdict: Verdict | None) -> int: ...


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
        embed_batch: int | None = None,
    ) -> None:
        self.model = model
        self.library = library
        self.effects = effects
        self.max_text_chars = max_text_chars
        self.executor = executor
        self.embed_batch = embed_batch
        self.use_library(library)

    def use_library(self, library: PolicyLibrary) -> None:
        """Judge against ``library`` from now on: the worker calls this when another policy version starts
        enforcing (a promotion or a rollback), so triage verdicts cite the version that enforces."""
        self.library = library
        self.enforcing = library.enforcing_ids()
        self.default_policies = library.default_ids()

    async def handle_batch(self, records: Sequence[Record]) -> None:
        """Decode each record, score the valid ones together, then decide each on its own (guarded).

        One bad record never takes its batch-mates with it: bad input is dead-lettered alone, and when scoring the
        batch raises, each item is scored alone so that only those that fail are dead-lettered (an embedder server
        that is unavailable is an outage instead: pause, then score again).

        A batch larger than ``embed_batch`` is scored in chunks of that size, each chunk's effects published while
        the next chunk is embedded (the embedder runs in the executor, the effects on the event loop, which would
        otherwise wait for each other); chunks are decided in order, and the batch is done when the last one is.
        """
        limits = self.effects.limits
        decoded: list[tuple[Record, ContentItem]] = []
        for record in records:
            try:
                self.effects.check_edge(record)
                decoded.append((record, decode_content_item(record.value, self.max_text_chars,
                                                            max_bytes=limits.max_message_bytes,
                                                            max_depth=limits.max_json_depth)))
            except PermanentError as exc:
                metrics.messages_total.labels(self.stage, "bad_input").inc()
                await self.effects.dead_letter(record, self.stage, exc)
        if not decoded:
            return
        size = self.embed_batch or len(decoded)
        deciding: asyncio.Task[None] | None = None
        try:
            for start in range(0, len(decoded), size):
                scored = await self._score(decoded[start : start + size])
                if deciding is not None:
                    await deciding
                    deciding = None
                if scored:
                    metrics.triage_batch_size.observe(len(scored))
                    metrics.triage_latency_seconds.observe(scored[0][2].latency_ms / 1000.0)
                    deciding = asyncio.ensure_future(self._decide_scored(scored))
            if deciding is not None:
                await deciding
                deciding = None
        finally:
            if deciding is not None:  # something raised while a chunk was being decided: do not leave it running
                deciding.cancel()
                await asyncio.gather(deciding, return_exceptions=True)

    async def _decide_scored(self, scored: list[tuple[Record, ContentItem, TriageScores]]) -> None:
        rest = await self._decide_together(scored)
        await asyncio.gather(
            *(
                guarded(self.effects, record, self.stage, lambda r=record, i=item, s=score: self._decide(r, i, s))
                for record, item, score in rest
            )
        )

    async def _score(
        self, decoded: list[tuple[Record, ContentItem]]
    ) -> list[tuple[Record, ContentItem, TriageScores]]:
        """Scores for the items that can be scored; an item whose scoring fails alone is dead-lettered."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                scores = await loop.run_in_executor(self.executor, self.model.score, [i.text for _, i in decoded])
                return [(record, item, score) for (record, item), score in zip(decoded, scores, strict=True)]
            except Exception as exc:  # noqa: BLE001 - a scoring failure must not lose the batch
                if (dependency := outage_of(exc)) is not None:
                    await self.effects.outages.wait(dependency, exc, decoded[0][0].where)
                    continue
                if len(decoded) == 1:
                    record, item = decoded[0]
                    logger.warning("triage: scoring %s %s failed: %s", record.where, item.content_id,
                                   type(exc).__name__)
                    metrics.messages_total.labels(self.stage, "unexpected_error").inc()
                    await self.effects.dead_letter(record, self.stage, exc, content_id=item.content_id)
                    return []
                logger.warning("triage: scoring a batch of %d failed (%s); scoring each item alone", len(decoded),
                               type(exc).__name__)
                break
        alone: list[tuple[Record, ContentItem, TriageScores]] = []
        for one in decoded:
            alone.extend(await self._score([one]))
        return alone

    async def _decide(self, record: Record, item: ContentItem, scores: TriageScores) -> None:
        """One message on its own: what a redelivery, an edit or a batch that could not be decided together takes."""
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
        decision, policies = self._route(item, scores)
        supersedes = await self.effects.superseded(cid, revision.number)
        verdict, escalation = self._effects_of(record, item, scores, decision, policies, revision.number, supersedes)
        # Hide first: the item must be hidden before anyone can learn it was escalated.
        await self.effects.verdict(verdict)
        if escalation is not None:
            if await self.effects.emit(EffectKind.ESCALATION, slot, cid, escalation.to_bytes()):
                metrics.escalations_total.labels(escalation.reason.value).inc()
        self._log(record, verdict, escalation)

    async def _decide_together(
        self, scored: list[tuple[Record, ContentItem, TriageScores]]
    ) -> list[tuple[Record, ContentItem, TriageScores]]:
        """Decide the batch's new items together; returns the items left for :meth:`_decide`, one by one.

        The steps per item are those of :meth:`_decide`, in the same order (revision, look for recorded effects,
        record the verdict, publish it, mark it, then the same for the escalation), but each step runs for the
        whole batch at once: one Redis round trip and one produce call per step instead of one per item (that is
        where a triage worker spent most of its time besides embedding). Left for :meth:`_decide`: redeliveries
        and replays (something already recorded), edits (a revision above 1 looks up the verdict it supersedes),
        an id that occurs twice in the batch, an item whose policies do not resolve (its dead letter is written
        there), and every item not finished when a step fails (an outage, a bug): :func:`guarded` runs them
        again, and the ledger makes that second run finish what this one started.
        """
        seen: dict[str, int] = {}
        for _, item, _ in scored:
            seen[item.content_id] = seen.get(item.content_id, 0) + 1
        rest = [entry for entry in scored if seen[entry[1].content_id] > 1]
        batch = [entry for entry in scored if seen[entry[1].content_id] == 1]
        if not batch:
            return rest
        store = self.effects.store
        # Revisions are assigned while the ledger is read for revision 1 (nearly every item is a first revision;
        # an item whose revision turns out higher goes to the one-by-one path, which reads its own slot).
        slots = [item_effect(item.content_id, 1) for _, item, _ in batch]
        revisions, found = await asyncio.gather(
            store.revisions([(item.content_id, text_hash(item.text), record.message_id) for record, item, _ in batch]),
            store.recorded_many([(kind, slot) for slot in slots for kind in (EffectKind.FINAL, EffectKind.ESCALATION)]),
            return_exceptions=True,
        )
        for outcome in (revisions, found):
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, Exception):
                    raise outcome
                # The per-item path handles outages and failures one by one.
                logger.info("triage: batch of %d decided one by one (%s)", len(scored), type(outcome).__name__)
                return scored
        assert isinstance(revisions, list) and isinstance(found, list)
        planned: list[tuple[tuple[Record, ContentItem, TriageScores], Verdict, Escalation | None]] = []
        for n, (entry, revision) in enumerate(zip(batch, revisions, strict=True)):
            record, item, scores = entry
            if revision.number != 1 or found[2 * n] is not None or found[2 * n + 1] is not None:
                rest.append(entry)
                continue
            try:
                decision, policies = self._route(item, scores)
                verdict, escalation = self._effects_of(record, item, scores, decision, policies, 1, None)
            except Exception:  # noqa: BLE001 - a PolicyError (or a bug) becomes this item's dead letter in _decide
                rest.append(entry)
                continue
            planned.append((entry, verdict, escalation))
        verdicts = [verdict for _, verdict, _ in planned]
        escalations = [escalation for _, _, escalation in planned if escalation is not None]
        try:
            # Hide first: the verdicts (the provisional hides among them) are published before any escalation.
            recorded = await self.effects.emit_many(
                [self.effects.verdict_effect(v) for v in verdicts],
                then=[(EffectKind.ESCALATION, item_effect(e.item.content_id, 1), e.item.content_id, e.to_bytes(), None)
                      for e in escalations],
            )
        except Exception as exc:  # noqa: BLE001 - as above
            logger.info("triage: batch of %d finished one by one (%s)", len(planned), type(exc).__name__)
            return rest + [entry for entry, _, _ in planned]
        self.effects.count_verdicts(verdicts, recorded[: len(verdicts)])
        for escalation, stored in zip(escalations, recorded[len(verdicts):], strict=True):
            if stored.created:
                metrics.escalations_total.labels(escalation.reason.value).inc()
        for (record, _, _), verdict, escalation in planned:
            metrics.messages_total.labels(self.stage, "ok").inc()
            self._log(record, verdict, escalation)
        if planned:
            self.effects.outages.clear()
        return rest

    def _route(self, item: ContentItem, scores: TriageScores) -> tuple[TriageDecision, list[PolicyRef]]:
        """Where the item goes and the policies that apply; PolicyError when none of those it asks for enforces."""
        if item.policy_ids:
            enforcing = [p for p in item.policy_ids if p in self.enforcing]
            if not enforcing:
                raise PolicyError(f"none of the requested policies {item.policy_ids} is enforcing")
        else:
            enforcing = self.default_policies
        # The language the scorer detected (pipeline.triage.ScoredText), else the one the producer declared.
        decision = route_triage(scores, self.model.thresholds, enforcing,
                                language=getattr(scores, "language", None) or item.language)
        return decision, _policy_refs(self.library, decision.policy_ids)

    def _effects_of(self, record: Record, item: ContentItem, scores: TriageScores, decision: TriageDecision,
                    policies: list[PolicyRef], revision: int, supersedes: str | None,
                    ) -> tuple[Verdict, Escalation | None]:
        """The verdict to publish (final, or provisional when escalating) and the escalation, if any."""
        cid = item.content_id
        ingested = ingest_time(record)
        latency = Latency(triage_ms=scores.latency_ms, since_ingest_ms=since_ingest_ms(ingested))
        if decision.route is TriageRoute.ESCALATE:
            assert decision.reason is not None
            provisional = Verdict.provisional(
                cid, Stage.TRIAGE, revision=revision, supersedes=supersedes, platform=item.platform,
                triage=scores, policies=policies,
                latency=latency, rationale=f"hidden pending policy review ({decision.reason.value}"
                f"{': ' + decision.note if decision.note else ''})",
            )
            escalation = Escalation(
                item=item,
                revision=revision,
                triage=scores,
                reason=decision.reason,
                policy_ids=list(decision.policy_ids),
                ingested_at=ingested,
            )
            return provisional, escalation
        blocked = decision.route is TriageRoute.BLOCK
        thresholds = self.model.thresholds
        comparison = f">= {thresholds.block_above:.3f}" if blocked else f"< {thresholds.allow_below:.3f}"
        final = Verdict.final(
            cid, Decision.BLOCK if blocked else Decision.ALLOW, Stage.TRIAGE,
            revision=revision, supersedes=supersedes, platform=item.platform, triage=scores,
            policies=policies if blocked else [],
            latency=latency, rationale=decision.note and f"triage classifier: {decision.note}"
            or f"triage classifier: violation probability {scores.violation:.3f} {comparison}",
        )
        return final, None

    @staticmethod
    def _log(record: Record, verdict: Verdict, escalation: Escalation | None) -> None:
        if escalation is not None:
            logger.info("triage: %s %s r%d escalated (%s)", record.where, verdict.content_id, verdict.revision,
                        escalation.reason.value)
        else:
            logger.info("triage: %s %s r%d %s", record.where, verdict.content_id, verdict.revision,
                        verdict.decision.value)


class ReasoningHandler:
    """moderation.escalations -> final verdict from the reasoning model, or a review task (fail closed)."""

    stage = "reasoning"

    def __init__(self, reasoner: Judge, library: PolicyLibrary, effects: Effects,
                 shadow: ShadowHook | None = None) -> None:
        self.reasoner = reasoner
        self.library = library  # replaced by the worker when another policy version starts enforcing
        self.effects = effects
        self.shadow = shadow

    def _offer_shadow(self, escalation: Escalation, outcome: ReasonerOutcome, verdict: Verdict | None) -> None:
        """Shadow judgements start only once the enforced outcome is out, and can never fail the message."""
        if self.shadow is None:
            return
        try:
            self.shadow.offer(escalation, outcome, verdict)
        except Exception:  # noqa: BLE001 - the item is decided and published; shadowing is evidence only
            logger.exception("reasoning: shadow offer for %s failed", escalation.item.content_id)

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
            standing = await self.effects.verdict(final)
            self._offer_shadow(escalation, outcome, standing)
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
        self._offer_shadow(escalation, outcome, None)
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
