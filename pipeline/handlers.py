"""What each worker role does with a message, as plain async code that tests without Faust.

The Faust agents in :mod:`pipeline.app` only turn events into :class:`~pipeline.kafka_io.Record`s and call these.
Every handler obeys the same contract: it never raises. Each message ends as a published effect (verdict,
escalation, review task) or a dead letter; transient failures are retried with bounded exponential backoff first.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Executor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, TypeVar

from pipeline import metrics
from pipeline.codec import decode_content_item, decode_model, sniff_content_id
from pipeline.config import Settings
from pipeline.errors import PermanentError, PolicyError, RetryableError
from pipeline.kafka_io import Publisher, Record
from pipeline.router import ReasoningRoute, TriageRoute, route_triage
from pipeline.schemas import (
    ContentItem,
    DeadLetter,
    Decision,
    Escalation,
    Latency,
    PolicyRef,
    ReviewTask,
    Stage,
    TriageScores,
    Verdict,
    VerdictStatus,
)
from pipeline.store import EffectKind, Store

if TYPE_CHECKING:
    from pipeline.policies import PolicyLibrary
    from pipeline.reasoner import TritonReasoner
    from pipeline.triage import TriageModel

log = logging.getLogger(__name__)
T = TypeVar("T")

STORE_ATTEMPTS = 6  # ~0.2 s .. 6.4 s of backoff: rides out a Redis failover, not an outage


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _since_ingest_ms(ingested_at: datetime) -> float:
    return max(0.0, (_now() - ingested_at).total_seconds() * 1000.0)


def ingest_time(record: Record) -> datetime:
    """The broker timestamp of a message (when it arrived), or now if the broker gave none."""
    if record.timestamp_ms is None or record.timestamp_ms <= 0:
        return _now()
    return datetime.fromtimestamp(record.timestamp_ms / 1000.0, tz=timezone.utc)


async def with_retries(
    operation: Callable[[], Awaitable[T]], *, stage: str, attempts: int, initial_s: float = 0.2, max_s: float = 8.0
) -> T:
    """Run ``operation``; retry :class:`RetryableError` with exponential backoff, re-raise after ``attempts``."""
    delay = initial_s
    for attempt in range(1, attempts + 1):
        try:
            return await operation()
        except RetryableError as exc:
            metrics.retries_total.labels(stage, type(exc).__name__).inc()
            if attempt == attempts:
                raise
            log.warning("%s: %s (attempt %d/%d), retrying in %.1fs", stage, exc, attempt, attempts, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_s)
    raise AssertionError("unreachable")


class Effects:
    """Publishes effects through the ledger: record once, publish the stored payload, mark published."""

    def __init__(self, settings: Settings, store: Store, publisher: Publisher) -> None:
        self.settings = settings
        self.store = store
        self.publisher = publisher
        kafka = settings.kafka
        self.topics = {
            EffectKind.FINAL: kafka.topic(kafka.verdicts_topic),
            EffectKind.PROVISIONAL: kafka.topic(kafka.verdicts_topic),
            EffectKind.ESCALATION: kafka.topic(kafka.escalations_topic),
            EffectKind.REVIEW: kafka.topic(kafka.review_topic),
            EffectKind.DEAD_LETTER: kafka.topic(kafka.deadletter_topic),
        }

    async def emit(
        self, kind: EffectKind, effect_id: str, key: str | None, payload: bytes, verdict: Verdict | None = None
    ) -> bool:
        """Publish the effect unless it was published before. True if this call created it."""
        recorded = await with_retries(
            lambda: self.store.record(kind, effect_id, payload, verdict), stage=kind.value, attempts=STORE_ATTEMPTS
        )
        if not recorded.created:
            metrics.redeliveries_total.labels(kind.value).inc()
        if not recorded.published:
            await self.publisher.send(self.topics[kind], key, recorded.payload)
            await with_retries(
                lambda: self.store.mark_published(kind, effect_id), stage=kind.value, attempts=STORE_ATTEMPTS
            )
        return recorded.created

    async def finish_pending(self, kind: EffectKind, effect_id: str, key: str) -> bool:
        """If an effect was recorded earlier, make sure it is published. True if one existed."""
        recorded = await with_retries(
            lambda: self.store.recorded(kind, effect_id), stage=kind.value, attempts=STORE_ATTEMPTS
        )
        if recorded is None:
            return False
        metrics.redeliveries_total.labels(kind.value).inc()
        if not recorded.published:
            await self.publisher.send(self.topics[kind], key, recorded.payload)
            await self.store.mark_published(kind, effect_id)
        return True

    async def verdict(self, verdict: Verdict) -> None:
        kind = EffectKind.FINAL if verdict.status is VerdictStatus.FINAL else EffectKind.PROVISIONAL
        if await self.emit(kind, verdict.content_id, verdict.content_id, verdict.to_bytes(), verdict):
            metrics.verdicts_total.labels(verdict.stage.value, verdict.status.value, verdict.decision.value).inc()
            if verdict.latency.since_ingest_ms is not None:
                metrics.verdict_latency_seconds.labels(verdict.stage.value, verdict.status.value).observe(
                    verdict.latency.since_ingest_ms / 1000.0
                )

    async def dead_letter(
        self, record: Record, stage: str, error: BaseException, content_id: str | None = None, attempts: int = 1
    ) -> None:
        """Dead-letter one message, once per (topic, partition, offset), with the raw bytes and the reason."""
        letter = DeadLetter(
            stage=stage,
            error_type=type(error).__name__,
            error=str(error) or type(error).__name__,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=base64.b64encode(record.key).decode() if record.key is not None else None,
            raw_base64=base64.b64encode(record.value or b"").decode(),
            content_id=content_id or sniff_content_id(record.value),
            attempts=attempts,
        )
        log.warning("%s: dead letter from %s (content_id=%s): %s", stage, record.where, letter.content_id, letter.error)
        metrics.dead_letters_total.labels(stage, letter.error_type).inc()
        # Offsets identify a message only within one incarnation of a topic (a recreated topic, or a restarted
        # in-memory broker, reuses them); the digest of the bytes keeps a new message at an old offset distinct.
        digest = hashlib.sha256(record.value or b"").hexdigest()[:16]
        effect_id = f"{record.topic}:{record.partition}:{record.offset}:{digest}"
        try:
            await self.emit(EffectKind.DEAD_LETTER, effect_id, letter.content_id, letter.to_bytes())
        except RetryableError:
            # The ledger is down: publishing without it may duplicate a dead letter but never loses one.
            await self.publisher.send(self.topics[EffectKind.DEAD_LETTER], letter.content_id, letter.to_bytes())


async def guarded(effects: Effects, record: Record, stage: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run one message's work; whatever escapes becomes a dead letter, never an exception in the agent."""
    try:
        await work()
        metrics.messages_total.labels(stage, "ok").inc()
    except PermanentError as exc:
        metrics.messages_total.labels(stage, "permanent_error").inc()
        await effects.dead_letter(record, stage, exc)
    except Exception as exc:  # noqa: BLE001 - the agent must survive any bug; the message is kept as a dead letter
        metrics.messages_total.labels(stage, "unexpected_error").inc()
        log.exception("%s: unexpected error on %s", stage, record.where)
        await effects.dead_letter(record, stage, exc)


def _policy_refs(library: PolicyLibrary, policy_ids: Sequence[str]) -> list[PolicyRef]:
    return [library.get(pid).ref() for pid in policy_ids]


class TriageHandler:
    """content.incoming -> final verdict (confident) or provisional verdict + escalation."""

    stage = Stage.TRIAGE.value

    def __init__(
        self,
        settings: Settings,
        model: TriageModel,
        library: PolicyLibrary,
        effects: Effects,
        executor: Executor | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.library = library
        self.effects = effects
        self.executor = executor
        self.enforcing = library.enforcing_ids()
        self.default_policies = library.default_ids()

    async def handle_batch(self, records: Sequence[Record]) -> None:
        decoded: list[tuple[Record, ContentItem]] = []
        for record in records:
            try:
                decoded.append((record, decode_content_item(record.value, self.settings.triage.max_text_chars)))
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
            log.exception("triage: scoring a batch of %d failed", len(decoded))
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
        # A redelivered or replayed item whose effects exist: finish publishing them, decide nothing new.
        if await self.effects.finish_pending(EffectKind.FINAL, cid, cid):
            return
        if await self.effects.finish_pending(EffectKind.ESCALATION, cid, cid):
            await self.effects.finish_pending(EffectKind.PROVISIONAL, cid, cid)
            return
        if item.policy_ids:
            enforcing = [p for p in item.policy_ids if p in self.enforcing]
            if not enforcing:
                raise PolicyError(f"none of the requested policies {item.policy_ids} is enforcing")
        else:
            enforcing = self.default_policies
        decision = route_triage(scores, self.model.thresholds, enforcing)
        ingested = ingest_time(record)
        latency = Latency(triage_ms=scores.latency_ms, since_ingest_ms=_since_ingest_ms(ingested))
        policies = _policy_refs(self.library, decision.policy_ids)
        if decision.route is TriageRoute.ESCALATE:
            assert decision.reason is not None
            provisional = Verdict(
                verdict_id=uuid.uuid4().hex,
                content_id=cid,
                status=VerdictStatus.PROVISIONAL,
                decision=Decision.HIDE_PENDING,
                stage=Stage.TRIAGE,
                triage=scores,
                policies=policies,
                rationale=f"hidden pending policy review ({decision.reason.value})",
                latency=latency,
            )
            # Hide first: the item must be hidden before anyone can learn it was escalated.
            await self.effects.verdict(provisional)
            escalation = Escalation(
                item=item,
                triage=scores,
                reason=decision.reason,
                policy_ids=list(decision.policy_ids),
                ingested_at=ingested,
            )
            if await self.effects.emit(EffectKind.ESCALATION, cid, cid, escalation.to_bytes()):
                metrics.escalations_total.labels(decision.reason.value).inc()
            log.info("triage: %s %s escalated (%s)", record.where, cid, decision.reason.value)
            return
        blocked = decision.route is TriageRoute.BLOCK
        thresholds = self.model.thresholds
        comparison = f">= {thresholds.block_above:.3f}" if blocked else f"< {thresholds.allow_below:.3f}"
        final = Verdict(
            verdict_id=uuid.uuid4().hex,
            content_id=cid,
            status=VerdictStatus.FINAL,
            decision=Decision.BLOCK if blocked else Decision.ALLOW,
            stage=Stage.TRIAGE,
            triage=scores,
            policies=policies if blocked else [],
            rationale=f"triage classifier: violation probability {scores.violation:.3f} {comparison}",
            latency=latency,
        )
        await self.effects.verdict(final)
        log.info("triage: %s %s %s", record.where, cid, final.decision.value)


class ReasoningHandler:
    """moderation.escalations -> final verdict from the reasoning model, or a review task (fail closed)."""

    stage = "reasoning"

    def __init__(self, settings: Settings, reasoner: TritonReasoner, library: PolicyLibrary, effects: Effects) -> None:
        self.settings = settings
        self.reasoner = reasoner
        self.library = library
        self.effects = effects

    async def handle(self, record: Record) -> None:
        await guarded(self.effects, record, self.stage, lambda: self._handle(record))

    async def _handle(self, record: Record) -> None:
        escalation = decode_model(record.value, Escalation)
        item = escalation.item
        cid = item.content_id
        if await self.effects.finish_pending(EffectKind.FINAL, cid, cid):
            return
        if await self.effects.finish_pending(EffectKind.REVIEW, cid, cid):
            return
        for policy_id in escalation.policy_ids:
            self.library.get(policy_id)  # PolicyError (dead letter, item stays hidden) for an unknown policy
        outcome = await self.reasoner.judge(item, escalation.policy_ids, triage=escalation.triage)
        latency = Latency(
            triage_ms=escalation.triage.latency_ms,
            reasoner_ms=outcome.latency_ms,
            since_ingest_ms=_since_ingest_ms(escalation.ingested_at),
        )
        if outcome.route in (ReasoningRoute.ALLOW, ReasoningRoute.BLOCK):
            blocked = outcome.route is ReasoningRoute.BLOCK
            final = Verdict(
                verdict_id=uuid.uuid4().hex,
                content_id=cid,
                status=VerdictStatus.FINAL,
                decision=Decision.BLOCK if blocked else Decision.ALLOW,
                stage=Stage.REASONER,
                triage=escalation.triage,
                policies=outcome.policies,
                reasoner_calls=outcome.calls,
                rule_ids=outcome.rule_ids,
                rationale=outcome.rationale,
                latency=latency,
            )
            await self.effects.verdict(final)
            # Triage hid the item just before escalating it: escalated_at is when the hide began.
            metrics.time_hidden_seconds.labels(Stage.REASONER.value).observe(
                max(0.0, (final.decided_at - escalation.escalated_at).total_seconds())
            )
            log.info("reasoning: %s %s %s (effort %s)", record.where, cid, final.decision.value, outcome.effort.value)
            return
        assert outcome.review_reason is not None
        task = ReviewTask(
            task_id=uuid.uuid4().hex,
            item=item,
            triage=escalation.triage,
            reason=outcome.review_reason,
            policy_ids=escalation.policy_ids,
            reasoner_calls=outcome.calls,
            ingested_at=escalation.ingested_at,
        )
        if await self.effects.emit(EffectKind.REVIEW, cid, cid, task.to_bytes()):
            metrics.review_tasks_total.labels(outcome.review_reason.value).inc()
        log.info("reasoning: %s %s to review (%s)", record.where, cid, outcome.review_reason.value)


class ReviewIntakeHandler:
    """moderation.review -> the reviewers' queue in Redis (oldest first, one task per item)."""

    stage = "review_intake"

    def __init__(self, store: Store, effects: Effects) -> None:
        from pipeline.review_queue import ReviewQueue, default_severities

        self.store = store
        self.effects = effects
        self.queue = ReviewQueue(store, default_severities(effects.settings.reasoner.policies_dir))

    async def handle(self, record: Record) -> None:
        await guarded(self.effects, record, self.stage, lambda: self._handle(record))

    async def _handle(self, record: Record) -> None:
        task = decode_model(record.value, ReviewTask)

        async def enqueue() -> bool:
            # An item decided meanwhile (or a replayed task) must not come back to the reviewers.
            if (await self.store.recorded(EffectKind.FINAL, task.item.content_id)) is not None:
                return False
            return await self.queue.enqueue(task)

        added = await with_retries(enqueue, stage=self.stage, attempts=STORE_ATTEMPTS)
        log.info("review intake: %s %s %s", record.where, task.item.content_id, "queued" if added else "already known")
