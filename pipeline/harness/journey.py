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
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition

from pipeline.config import Settings
from pipeline.errors import StackError
from pipeline.reports import percentile
from pipeline.schemas import DeadLetter, ReviewTask, Verdict, VerdictStatus, parse_wire

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
        # (monotonic time, content id, what): when each settling message (final verdict, review task) arrived
        self.arrivals: list[tuple[float, str, str]] = []
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
            verdict = parse_wire(Verdict, value)
            if verdict.content_id.startswith(self.run_id):
                self.journeys[verdict.content_id].verdicts.append(verdict)
                if verdict.status is VerdictStatus.FINAL:
                    self.arrivals.append((time.monotonic(), verdict.content_id, f"final_{verdict.stage.value}"))
        elif topic == self.review_topic:
            task = parse_wire(ReviewTask, value)
            if task.item.content_id.startswith(self.run_id):
                self.journeys[task.item.content_id].review_tasks.append(task)
                self.arrivals.append((time.monotonic(), task.item.content_id, "review"))
        elif topic == self.deadletter_topic:
            letter = parse_wire(DeadLetter, value)
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
    model_calls = cached_calls = input_tokens = output_tokens = uncounted_calls = 0
    by_effort: dict[str, dict[str, int]] = defaultdict(lambda: {"calls": 0, "input_tokens": 0, "output_tokens": 0})
    for cid in content_ids:
        journey = observer.journeys.get(cid, Journey())
        finals = journey.finals
        # The reasoning calls made for the item, counted once: from its review task, else its first final verdict.
        calls = (journey.review_tasks[0].reasoner_calls if journey.review_tasks
                 else finals[0].reasoner_calls if finals else [])
        for call in calls:
            if call.cached:
                cached_calls += 1
                continue
            model_calls += 1
            if call.prompt_tokens is None and call.completion_tokens is None:
                uncounted_calls += 1
            input_tokens += call.prompt_tokens or 0
            output_tokens += call.completion_tokens or 0
            effort = by_effort[call.effort.value]
            effort["calls"] += 1
            effort["input_tokens"] += call.prompt_tokens or 0
            effort["output_tokens"] += call.completion_tokens or 0
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
    per_1000 = 1000 / len(content_ids) if content_ids else 0.0
    sent_to_review = sum(1 for c in content_ids if observer.journeys.get(c, Journey()).review_tasks)
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
        # What a deployment pays per 1,000 items: the share that needs the reasoning model, what it costs there
        # (calls that reached the model; cached answers cost none) and the share that ends with people.
        "per_1000_items": {
            "escalated": round(escalated * per_1000, 1),
            "sent_to_review": round(sent_to_review * per_1000, 1),
            "reasoner_calls": round(model_calls * per_1000, 1),
            "input_tokens": round(input_tokens * per_1000),
            "output_tokens": round(output_tokens * per_1000),
        },
        # What the reasoning model cost: calls that reached it (cached answers cost none) and their tokens.
        "reasoner": {
            "model_calls": model_calls,
            "cached_calls": cached_calls,
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "calls_without_token_counts": uncounted_calls,
            "by_effort": {name: dict(counts) for name, counts in sorted(by_effort.items())},
            "per_1000_items": {
                "model_calls": round(model_calls * per_1000, 1),
                "input_tokens": round(input_tokens * per_1000),
                "output_tokens": round(output_tokens * per_1000),
            },
        },
    }


def _ms(later: datetime, earlier: datetime) -> float:
    return max(0.0, (later - earlier).total_seconds() * 1000.0)


def stage_latencies(observer: JourneyObserver, content_ids: list[str]) -> dict[str, dict[str, float | int | None]]:
    """Latency per stage, from the item's broker timestamp on its input topic, p50/p95/p99 and how many items:

    - ``triage``: to the triage verdict (final, or the provisional hide of an escalated item);
    - ``reasoning``: to the end of the reasoning stage for escalated items (the reasoner's final verdict, or the
      review task it created);
    - ``settle``: to the first verdict that settles the item (a final verdict, or its review task): what a platform
      waits until every item is decided or with people.
    """
    triage: list[float] = []
    reasoning: list[float] = []
    settle: list[float] = []
    for cid in content_ids:
        journey = observer.journeys.get(cid)
        if journey is None:
            continue
        first_triage = next((v for v in journey.verdicts if v.stage.value == "triage"), None)
        if first_triage is not None and first_triage.latency.since_ingest_ms is not None:
            triage.append(first_triage.latency.since_ingest_ms)
        final = journey.finals[0] if journey.finals else None
        task = journey.review_tasks[0] if journey.review_tasks else None
        done_ms: float | None = None
        if final is not None and final.latency.since_ingest_ms is not None:
            done_ms = final.latency.since_ingest_ms
            if final.stage.value == "reasoner":
                reasoning.append(done_ms)
        elif task is not None:
            done_ms = _ms(task.created_at, task.ingested_at)
            reasoning.append(done_ms)
        if done_ms is not None:
            settle.append(done_ms)
    return {name: {"items": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
                   "p99": percentile(values, 99)}
            for name, values in (("triage", triage), ("reasoning", reasoning), ("settle", settle))}
