"""Effects: how a worker's decisions leave it. Record in the ledger, publish the stored payload, mark it published.

Every effect (final or provisional verdict, escalation, review task, dead letter) goes through :class:`Effects`,
so a redelivered message republishes at most the identical payload and never a second, different one. Ledger
calls are retried with bounded backoff (:mod:`pipeline.retry`).

An outage never condemns a message: when Redis, the broker or the model server is unavailable, :func:`guarded`
pauses (:class:`~pipeline.retry.Outages`: bounded backoff, readiness false, a metric and a log line naming the
dependency) and runs the same work again once it answers; the ledger makes the retry idempotent. Only bad input
and permanent failures become dead letters, each with its reason. A dependency down past the worker's bound raises
:class:`~pipeline.retry.WorkerStalled`, and the agent exits without acknowledging (redelivered, never lost).

A dead letter always fits the broker's limits: the raw value and key it carries are cut to
``LimitsSettings.dead_letter_raw_bytes`` / ``max_key_bytes``, with the whole value's length and sha256.

The domain talks to two protocols here: a :class:`~pipeline.store.base.StateStore` and a :class:`MessageSink`.
The real sink is :class:`pipeline.broker.Publisher` (aiokafka, ``acks=all``); :class:`RecordingPublisher` is the
in-memory one the unit tests and demos use.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Protocol, TypeVar

from pipeline import metrics
from pipeline.codec import Record, check_key, sniff_content_id
from pipeline.config import KafkaSettings, LimitsSettings
from pipeline.errors import (
    BrokerUnavailable,
    ContentTooLarge,
    PermanentError,
    ReasonerTimeout,
    ReasonerUnavailable,
    RetryableError,
    StoreUnavailable,
)
from pipeline.retry import Backoff, Outages, WorkerStalled, with_retries
from pipeline.schemas import DeadLetter, Verdict, VerdictStatus, parse_wire, utcnow
from pipeline.store.base import EffectId, EffectKind, Recorded, StateStore, item_effect, message_effect

logger = logging.getLogger(__name__)
T = TypeVar("T")

STORE_ATTEMPTS = 6  # ~0.2 s .. 6.4 s of backoff: rides out a Redis failover; a longer outage pauses the worker
STORE_BACKOFF = Backoff(initial_s=0.2, max_s=8.0)
ERROR_MAX_CHARS = 2000  # a dead letter's reason, so that its size stays bounded whatever an exception says


async def _nothing() -> None:
    return None


class CrashLoop(PermanentError):
    """A record its worker died on (process crash mid-record) more than ``LimitsSettings.max_attempts`` times."""


def outage_of(exc: BaseException) -> str | None:
    """The dependency whose unavailability ``exc`` shows (redis, broker, triton), or None if it is no outage."""
    if isinstance(exc, StoreUnavailable):
        return "redis"
    if isinstance(exc, BrokerUnavailable):
        return "broker"
    if isinstance(exc, (ReasonerUnavailable, ReasonerTimeout)):
        return "triton"
    if isinstance(exc, RetryableError):
        return "dependency"
    return None


class MessageSink(Protocol):
    """Where effects are published: ``send`` returns once the broker acknowledged the message."""

    async def send(self, topic: str, key: str | bytes | None, value: bytes) -> None: ...

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None: ...


@dataclass
class RecordingPublisher:
    """A :class:`MessageSink` that keeps every message in ``sent`` (topic, key bytes, value); ``fail_with`` makes
    every send raise that exception (a broker outage: :class:`~pipeline.errors.BrokerUnavailable`, which is what
    :class:`pipeline.broker.Publisher` raises for a send the broker did not acknowledge)."""

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

    def __init__(
        self,
        kafka: KafkaSettings,
        store: StateStore,
        publisher: MessageSink,
        *,
        limits: LimitsSettings | None = None,
        outages: Outages | None = None,
        on_published: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.limits = limits or LimitsSettings()
        self.outages = outages or Outages()
        self._on_published = on_published
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
            if self._on_published is not None:
                self._on_published()
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

    async def emit_many(
        self, effects: Sequence[tuple[EffectKind, EffectId, str | None, bytes, Verdict | None]],
        then: Sequence[tuple[EffectKind, EffectId, str | None, bytes, Verdict | None]] = (),
    ) -> list[Recorded]:
        """:meth:`emit` for a batch, ``(kind, effect_id, key, payload, verdict)`` each: one ledger round trip to
        record them all, one produce call for those still to publish (``send_many``), one round trip to mark them.
        ``then`` is a second batch that must follow the first (escalations after the verdicts that hide their
        items): it is recorded only once every effect of the first is published (in the same round trip that
        marks them), then published and marked the same way. Returns what was recorded, ``effects`` then ``then``.

        Each effect goes through the same steps in the same order as with :meth:`emit` (record, publish the
        stored payload, mark published). No retries and no outage handling here: any failure raises, and the
        caller runs the work again per message (:func:`guarded`), where the ledger makes the second run finish
        what the first started.
        """
        if not effects:
            return await self.emit_many(then) if then else []
        recorded = await self.store.record_many([(kind, eid, payload, verdict) for kind, eid, _, payload, verdict
                                                 in effects])
        marks = await self._publish_recorded(effects, recorded)
        if not then:
            if marks:
                await self.store.mark_published_many(marks)
            return recorded
        # Marking the first batch and recording the second are independent: one round trip's wait for both.
        marked, later = await asyncio.gather(
            self.store.mark_published_many(marks) if marks else _nothing(),
            self.store.record_many([(kind, eid, payload, verdict) for kind, eid, _, payload, verdict in then]),
            return_exceptions=True,
        )
        for outcome in (marked, later):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(later, list)
        marks = await self._publish_recorded(then, later)
        if marks:
            await self.store.mark_published_many(marks)
        return recorded + later

    async def _publish_recorded(self, effects: Sequence[tuple[EffectKind, EffectId, str | None, bytes, Verdict | None]],
                                recorded: list[Recorded]) -> list[tuple[EffectKind, EffectId]]:
        """Publish the stored payloads not published yet (one ``send_many``); returns what to mark published."""
        unpublished = [(effect, stored) for effect, stored in zip(effects, recorded, strict=True)
                       if not stored.published]
        for (kind, *_), stored in zip(effects, recorded, strict=True):
            if not stored.created:
                metrics.redeliveries_total.labels(kind.value).inc()
        if not unpublished:
            return []
        await self.publisher.send_many([(self.topics[kind], key, stored.payload)
                                        for (kind, _, key, _, _), stored in unpublished])
        if self._on_published is not None:
            self._on_published()
        return [(kind, eid) for (kind, eid, *_), _ in unpublished]

    def count_verdicts(self, verdicts: Sequence[Verdict], recorded: Sequence[Recorded]) -> None:
        """The metrics :meth:`verdict` keeps, for verdicts published through :meth:`emit_many`."""
        for verdict, stored in zip(verdicts, recorded, strict=True):
            if stored.created:
                metrics.verdicts_total.labels(verdict.stage.value, verdict.status.value, verdict.decision.value).inc()
                if verdict.latency.since_ingest_ms is not None:
                    metrics.verdict_latency_seconds.labels(verdict.stage.value, verdict.status.value).observe(
                        verdict.latency.since_ingest_ms / 1000.0
                    )

    @staticmethod
    def verdict_effect(verdict: Verdict) -> tuple[EffectKind, EffectId, str | None, bytes, Verdict | None]:
        """A verdict as :meth:`emit_many` takes it: in its revision's slot, keyed by its content id."""
        kind = EffectKind.FINAL if verdict.status is VerdictStatus.FINAL else EffectKind.PROVISIONAL
        return kind, item_effect(verdict.content_id, verdict.revision), verdict.content_id, verdict.to_bytes(), verdict

    async def superseded(self, content_id: str, revision: int, lookback: int = 8) -> str | None:
        """The final verdict a verdict on ``revision`` replaces: that of the nearest earlier revision that has one
        (an edit supersedes what the platform shows), or None for a first revision."""
        for earlier in range(revision - 1, max(0, revision - 1 - lookback), -1):
            slot = item_effect(content_id, earlier)
            stored = await self.ledger("supersedes", lambda s=slot: self.store.recorded(EffectKind.FINAL, s))
            if stored is not None:
                return parse_wire(Verdict, stored.payload).verdict_id
        return None

    def check_edge(self, record: Record) -> None:
        """The limits every role enforces before decoding: the key's and the value's size."""
        check_key(record.key, self.limits.max_key_bytes)
        size = len(record.value or b"")
        if size > self.limits.max_message_bytes:
            raise ContentTooLarge(f"message value is {size} bytes, over the {self.limits.max_message_bytes}-byte limit")

    def letter(
        self, record: Record, stage: str, error: BaseException, content_id: str | None = None, attempts: int = 1
    ) -> DeadLetter:
        """The dead letter for ``record``, its raw value and key cut to the limits (length and digest kept)."""
        value, key = record.value or b"", record.key
        keep = self.limits.dead_letter_raw_bytes
        raw = value[:keep]
        cut_key = key[: self.limits.max_key_bytes] if key is not None else None
        message = (str(error) or type(error).__name__)[:ERROR_MAX_CHARS]
        return DeadLetter(
            stage=stage,
            error_type=type(error).__name__,
            error=message,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            key=base64.b64encode(cut_key).decode() if cut_key is not None else None,
            key_length=len(key) if key is not None else None,
            key_truncated=key is not None and len(cut_key or b"") < len(key),
            raw_base64=base64.b64encode(raw).decode(),
            raw_length=len(value),
            raw_sha256=hashlib.sha256(value).hexdigest(),
            raw_truncated=len(raw) < len(value),
            content_id=content_id or sniff_content_id(value),
            attempts=attempts,
        )

    async def dead_letter(
        self, record: Record, stage: str, error: BaseException, content_id: str | None = None, attempts: int = 1
    ) -> None:
        """Dead-letter one message, once per (topic, partition, offset, bytes), with the reason and its raw bytes.

        Waits out a broker outage (the letter is the message's only trace: it must not be lost either).
        """
        letter = self.letter(record, stage, error, content_id, attempts)
        logger.warning("%s: dead letter from %s (content_id=%s): %s", stage, record.where, letter.content_id,
                       letter.error)
        metrics.dead_letters_total.labels(stage, letter.error_type).inc()
        # Offsets identify a message only within one incarnation of a topic (a recreated topic, or a restarted
        # in-memory broker, reuses them); the digest of the bytes keeps a new message at an old offset distinct.
        digest = letter.raw_sha256[:16]
        effect_id = message_effect(record.topic, record.partition, record.offset, digest)
        payload = letter.to_bytes()
        while True:
            try:
                try:
                    await self.emit(EffectKind.DEAD_LETTER, effect_id, letter.content_id, payload)
                except StoreUnavailable:
                    # The ledger is down: publishing without it may duplicate a dead letter but never loses one.
                    await self.publisher.send(self.topics[EffectKind.DEAD_LETTER], letter.content_id, payload)
                return
            except BrokerUnavailable as exc:
                await self.outages.wait("broker", exc, record.where)


async def guarded(effects: Effects, record: Record, stage: str, work: Callable[[], Awaitable[None]]) -> None:
    """Run one message's work until it ends as its effects or a dead letter; never raise for the message.

    Bad input and permanent failures become dead letters at once; an unexpected exception (a bug) too, so that
    the agent survives it. A dependency outage pauses and runs the same work again (see the module docstring);
    only :class:`~pipeline.retry.WorkerStalled` escapes, when the outage outlasts the worker's bound.
    """
    try:
        effects.check_edge(record)
    except PermanentError as exc:
        metrics.messages_total.labels(stage, "bad_input").inc()
        await effects.dead_letter(record, stage, exc)
        return
    while True:
        try:
            await work()
        except PermanentError as exc:
            metrics.messages_total.labels(stage, "permanent_error").inc()
            error: BaseException = exc
        except WorkerStalled:
            raise
        except Exception as exc:  # noqa: BLE001 - the agent must survive any bug; the message is kept as a dead letter
            dependency = outage_of(exc)
            if dependency is not None:
                await effects.outages.wait(dependency, exc, record.where)
                continue
            metrics.messages_total.labels(stage, "unexpected_error").inc()
            logger.exception("%s: unexpected error on %s", stage, record.where)
            error = exc
        else:
            effects.outages.clear()
            metrics.messages_total.labels(stage, "ok").inc()
            return
        await effects.dead_letter(record, stage, error)
        return
