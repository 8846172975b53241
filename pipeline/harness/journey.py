"""Watch every item's journey through the pipeline: shared by the demo, chaos, benches and the e2e tests.

:class:`JourneyObserver` reads the output topics and reconstructs, per content id, what the pipeline said and when;
:func:`summarise` turns that into the run's report.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.config import Settings
from pipeline.errors import StackError
from pipeline.reports import percentile
from pipeline.schemas import DeadLetter, ReviewTask, Verdict, VerdictStatus

logger = logging.getLogger(__name__)


@dataclass
class Journey:
    """Everything the pipeline published about one content id, in arrival order."""

    verdicts: list[Verdict] = field(default_factory=list)
    review_tasks: list[ReviewTask] = field(default_factory=list)

    @property
    def finals(self) -> list[Verdict]:
        return [v for v in self.verdicts if v.status is VerdictStatus.FINAL]

    @property
    def distinct_finals(self) -> set[str]:
        return {v.verdict_id for v in self.finals}

    @property
    def settled(self) -> bool:
        return bool(self.finals) or bool(self.review_tasks)


class JourneyObserver:
    """Consumes verdicts, review tasks and dead letters, keeping those whose content id starts with ``run_id``."""

    def __init__(self, settings: Settings, run_id: str) -> None:
        self.settings = settings
        self.run_id = run_id
        kafka = settings.kafka
        self.verdicts_topic = kafka.topic(kafka.verdicts_topic)
        self.review_topic = kafka.topic(kafka.review_topic)
        self.deadletter_topic = kafka.topic(kafka.deadletter_topic)
        self.journeys: dict[str, Journey] = defaultdict(Journey)
        self.dead_letters: dict[tuple[str, int | None, int | None], DeadLetter] = {}
        self.dead_letter_copies = 0
        self.undecodable = 0
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Start reading from the current end of each topic (call before publishing)."""
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.settings.kafka.bootstrap_servers, enable_auto_commit=False, group_id=None
        )
        await consumer.start()
        await consumer.topics()  # refreshes the metadata that partitions_for_topic reads
        partitions = []
        for topic in (self.verdicts_topic, self.review_topic, self.deadletter_topic):
            found = consumer.partitions_for_topic(topic)
            if not found:
                raise StackError(f"topic {topic} does not exist; run `modpipe topics create`")
            for p in sorted(found):
                partitions.append(TopicPartition(topic, p))
        consumer.assign(partitions)
        await consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the end offsets now, so nothing published later is skipped
            await consumer.position(tp)
        self._consumer = consumer
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._consumer:
            await self._consumer.stop()

    async def _run(self) -> None:
        assert self._consumer is not None
        async for message in self._consumer:
            try:
                self._observe(message.topic, message.value)
            except ValueError:
                self.undecodable += 1

    def _observe(self, topic: str, value: bytes) -> None:
        if topic == self.verdicts_topic:
            verdict = Verdict.model_validate_json(value)
            if verdict.content_id.startswith(self.run_id):
                self.journeys[verdict.content_id].verdicts.append(verdict)
        elif topic == self.review_topic:
            task = ReviewTask.model_validate_json(value)
            if task.item.content_id.startswith(self.run_id):
                self.journeys[task.item.content_id].review_tasks.append(task)
        elif topic == self.deadletter_topic:
            letter = DeadLetter.model_validate_json(value)
            if (letter.content_id or "").startswith(self.run_id) or self._raw_mentions_run(letter):
                key = (letter.topic, letter.partition, letter.offset)
                if key in self.dead_letters:
                    self.dead_letter_copies += 1
                self.dead_letters[key] = letter

    def _raw_mentions_run(self, letter: DeadLetter) -> bool:
        return self.run_id.encode() in base64.b64decode(letter.raw_base64)

    async def wait_triaged(self, content_ids: list[str], timeout_s: float) -> bool:
        """Wait until every id has a verdict from the triage stage (final or provisional)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(any(v.stage.value == "triage" for v in self.journeys[c].verdicts) for c in content_ids):
                return True
            await asyncio.sleep(0.05)
        return False

    async def wait_settled(self, content_ids: list[str], dead_letters: int, timeout_s: float) -> bool:
        """Wait until every id has a final verdict or a review task and the expected dead letters arrived."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if len(self.dead_letters) >= dead_letters and all(self.journeys[c].settled for c in content_ids):
                return True
            await asyncio.sleep(0.25)
        return False


def summarise(observer: JourneyObserver, content_ids: list[str], published: int) -> dict[str, object]:
    """The run's report: routes, journeys checked, latencies, losses and duplicates."""
    routes: dict[str, int] = defaultdict(int)
    triage_ms: list[float] = []
    triage_compute_ms: list[float] = []
    final_ms: list[float] = []
    journey_errors: list[str] = []
    duplicates = 0
    identical_copies = 0
    pending_review = 0
    final_verdicts = 0
    escalated = 0
    for cid in content_ids:
        journey = observer.journeys.get(cid, Journey())
        finals = journey.finals
        identical_copies += len(journey.verdicts) - len({v.verdict_id for v in journey.verdicts})
        if len(journey.distinct_finals) > 1:
            duplicates += 1
            decisions = {v.decision.value for v in finals}
            journey_errors.append(f"{cid}: {len(journey.distinct_finals)} different final verdicts {sorted(decisions)}")
        provisional = [v for v in journey.verdicts if v.status is VerdictStatus.PROVISIONAL]
        triage_verdicts = [v for v in journey.verdicts if v.stage.value == "triage"]
        if triage_verdicts and triage_verdicts[0].latency.since_ingest_ms is not None:
            triage_ms.append(triage_verdicts[0].latency.since_ingest_ms)
        if triage_verdicts and triage_verdicts[0].triage is not None:
            triage_compute_ms.append(triage_verdicts[0].triage.latency_ms)
        if provisional:
            escalated += 1
        if finals:
            final_verdicts += 1
            first = finals[0]
            routes[f"{first.stage.value}_{first.decision.value}"] += 1
            if first.latency.since_ingest_ms is not None:
                final_ms.append(first.latency.since_ingest_ms)
            if first.stage.value != "triage":
                if not provisional:
                    journey_errors.append(f"{cid}: decided by {first.stage.value} without a provisional verdict")
                elif journey.verdicts.index(provisional[0]) > journey.verdicts.index(first):
                    journey_errors.append(f"{cid}: provisional verdict arrived after the final one")
        elif journey.review_tasks:
            pending_review += 1
            routes["review_pending"] += 1
            if not provisional:
                journey_errors.append(f"{cid}: sent to review without a provisional verdict (item not hidden)")
    lost = [c for c in content_ids if not observer.journeys.get(c, Journey()).settled]
    return {
        "published": published,
        "final_verdicts": final_verdicts,
        "pending_review": pending_review,
        "dead_letters": len(observer.dead_letters),
        "dead_letter_reasons": sorted({f"{d.error_type}: {d.error}"[:160] for d in observer.dead_letters.values()}),
        "duplicate_final_verdicts": duplicates,
        # Redelivered copies of the same verdict (same verdict_id): at-least-once at work, harmless to consumers.
        "identical_verdict_copies": identical_copies,
        "lost": len(lost),
        "lost_ids": lost[:20],
        "escalated": escalated,
        "escalation_rate": round(escalated / len(content_ids), 4) if content_ids else 0.0,
        "routes": dict(sorted(routes.items())),
        "journey_errors": journey_errors[:50],
        "latency_ms": {
            "triage_p50": percentile(triage_ms, 50),
            "triage_p99": percentile(triage_ms, 99),
            "final_p50": percentile(final_ms, 50),
            "final_p99": percentile(final_ms, 99),
            "triage_batch_compute_p50": percentile(triage_compute_ms, 50),
        },
    }
