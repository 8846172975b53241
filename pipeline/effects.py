"""Effects: how a worker's decisions leave it. Record in the ledger, publish the stored payload, mark it published.

Every effect (final or provisional verdict, escalation, review task, dead letter) goes through :class:`Effects`,
so a redelivered message republishes at most the identical payload and never a second, different one. Ledger
calls are retried with bounded backoff (:mod:`pipeline.retry`); a publish that fails raises to the agent loop,
which exits without acknowledging (the message is redelivered rather than lost).

The domain talks to two protocols here: a :class:`~pipeline.store.base.StateStore` and a :class:`MessageSink`.
The real sink is :class:`pipeline.broker.Publisher` (aiokafka, ``acks=all``); :class:`RecordingPublisher` is the
in-memory one the unit tests and demos use.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, TypeVar

from pipeline import metrics
from pipeline.codec import Record, sniff_content_id
from pipeline.config import KafkaSettings
from pipeline.errors import PermanentError, RetryableError
from pipeline.retry import Backoff, with_retries
from pipeline.schemas import DeadLetter, Verdict, VerdictStatus, parse_wire, utcnow
from pipeline.store.base import EffectId, EffectKind, Recorded, StateStore, item_effect, message_effect

logger = logging.getLogger(__name__)
T = TypeVar("T")

STORE_ATTEMPTS = 6  # ~0.2 s .. 6.4 s of backoff: rides out a Redis failover, not an outage
STORE_BACKOFF = Backoff(initial_s=0.2, max_s=8.0)


class MessageSink(Protocol):
    """Where effects are published: ``send`` returns once the broker acknowledged the message."""

    async def send(self, topic: str, key: str | bytes | None, value: bytes) -> None: ...

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None: ...


@dataclass
class RecordingPublisher:
    """A :class:`MessageSink` that keeps every message in ``sent`` (topic, key bytes, value); ``fail_with`` makes
    every send raise that exception, as a broker outage would."""

    sent: list[tuple[str, bytes | None, bytes]] = field(default_factory=list)
    fail_with: BaseException | None = None

    async def send(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append((topic, key.encode("utf-8") if isinstance(key, str) else key, value))

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None:
        for topic, key, value in messages:
            await self.send(topic, key, value)

    def on(self, topic: str) -> list[bytes]:
        """The values sent to ``topic``, in order."""
        return [value for sent_topic, _, value in self.sent if sent_topic == topic]


def ingest_time(record: Record) -> datetime:
    """The broker timestamp of a message (when it arrived), or now if the broker gave none."""
    if record.timestamp_ms is None or record.timestamp_ms <= 0:
        return utcnow()
    return datetime.fromtimestamp(record.timestamp_ms / 1000.0, tz=timezone.utc)


def since_ingest_ms(ingested_at: datetime) -> float:
    return max(0.0, (utcnow() - ingested_at).total_seconds() * 1000.0)


class Effects:
    """Publishes effects through the ledger: record once, publish the stored payload, mark published."""

    def __init__(self, kafka: KafkaSettings, store: StateStore, publisher: MessageSink) -> None:
        self.store = store
        self.publisher = publisher
        self.topics = {
            EffectKind.FINAL: kafka.topic(kafka.verdicts_topic),
            EffectKind.PROVISIONAL: kafka.topic(kafka.verdicts_topic),
            EffectKind.ESCALATION: kafka.topic(kafka.escalations_topic),
            EffectKind.REVIEW: kafka.topic(kafka.review_topic),
            EffectKind.DEAD_LETTER: kafka.topic(kafka.deadletter_topic),
        }

    async def ledger(self, stage: str, call: Callable[[], Awaitable[T]]) -> T:
        """One store call with the store's retries (``stage`` names it in metrics and logs)."""
        return await with_retries(lambda _: call(), stage=stage, attempts=STORE_ATTEMPTS, backoff=STORE_BACKOFF)

    async def _publish(self, kind: EffectKind, effect_id: EffectId, key: str | None, recorded: Recorded) -> None:
        if not recorded.published:
            await self.publisher.send(self.topics[kind], key, recorded.payload)
            await self.ledger(kind.value, lambda: self.store.mark_published(kind, effect_id))

    async def emit(
        self, kind: EffectKind, effect_id: EffectId, key: str | None, payload: bytes, verdict: Verdict | None = None
    ) -> bool:
        """Publish the effect unless it was published before. True if this call created it."""
        recorded = await self.ledger(
            kind.value, lambda: self.store.record(kind, effect_id, payload, verdict)
        )
        if not recorded.created:
            metrics.redeliveries_total.labels(kind.value).inc()
        await self._publish(kind, effect_id, key, recorded)
        return recorded.created

    async def finish_pending(self, kind: EffectKind, effect_id: EffectId, key: str) -> bool:
        """If an effect was recorded earlier, make sure it is published. True if one existed."""
        recorded = await self.ledger(
            kind.value, lambda: self.store.recorded(kind, effect_id)
        )
        if recorded is None:
            return False
        metrics.redeliveries_total.labels(kind.value).inc()
        await self._publish(kind, effect_id, key, recorded)
        return True

    async def verdict(self, verdict: Verdict) -> Verdict:
        """Publish a verdict in its revision's slot; returns the verdict that stands there (this one, unless one
        was recorded before: a redelivery then republishes the stored one)."""
        kind = EffectKind.FINAL if verdict.status is VerdictStatus.FINAL else EffectKind.PROVISIONAL
        effect_id = item_effect(verdict.content_id, verdict.revision)
        created = await self.emit(kind, effect_id, verdict.content_id, verdict.to_bytes(), verdict)
        if created:
            metrics.verdicts_total.labels(verdict.stage.value, verdict.status.value, verdict.decision.value).inc()
            if verdict.latency.since_ingest_ms is not None:
                metrics.verdict_latency_seconds.labels(verdict.stage.value, verdict.status.value).observe(
                    verdict.latency.since_ingest_ms / 1000.0
                )
            return verdict
        stored = await self.ledger(kind.value, lambda: self.store.recorded(kind, effect_id))
        return parse_wire(Verdict, stored.payload) if stored is not None else verdict

    async def superseded(self, content_id: str, revision: int, lookback: int = 8) -> str | None:
        """The final verdict a verdict on ``revision`` replaces: that of the nearest earlier revision that has one
        (an edit supersedes what the platform shows), or None for a first revision."""
        for earlier in range(revision - 1, max(0, revision - 1 - lookback), -1):
            slot = item_effect(content_id, earlier)
            stored = await self.ledger("supersedes", lambda s=slot: self.store.recorded(EffectKind.FINAL, s))
            if stored is not None:
                return parse_wire(Verdict, stored.payload).verdict_id
        return None

    async def dead_letter(
        self, record: Record, stage: str, error: BaseException, content_id: str | None = None, attempts: int = 1
    ) -> None:
        """Dead-letter one message, once per (topic, partition, offset, bytes), with the raw bytes and the reason."""
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
        logger.warning("%s: dead letter from %s (content_id=%s): %s", stage, record.where, letter.content_id,
                       letter.error)
        metrics.dead_letters_total.labels(stage, letter.error_type).inc()
        # Offsets identify a message only within one incarnation of a topic (a recreated topic, or a restarted
        # in-memory broker, reuses them); the digest of the bytes keeps a new message at an old offset distinct.
        digest = hashlib.sha256(record.value or b"").hexdigest()[:16]
        effect_id = message_effect(record.topic, record.partition, record.offset, digest)
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
        logger.exception("%s: unexpected error on %s", stage, record.where)
        await effects.dead_letter(record, stage, exc)
