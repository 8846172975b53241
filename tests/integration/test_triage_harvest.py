"""Harvesting learning rows from the real topics: escalations carry the text, verdicts and decisions the labels.

Why: the learning loop reads what the pipeline published, on a real Kafka-protocol broker, from the beginning of
each topic to its end; a row must only appear when its verdict or decision can be joined to the escalated item.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

import pytest

from pipeline.broker import Publisher, ensure_topics
from pipeline.config import KafkaSettings
from pipeline.schemas import (
    ContentItem,
    Decision,
    Effort,
    Escalation,
    EscalationReason,
    PolicyRef,
    ReasonerCall,
    ReviewAction,
    ReviewDecision,
    Stage,
    TriageScores,
    Verdict,
)
from triage_models.loop import harvest, read_topics

pytestmark = pytest.mark.integration
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
HATE = PolicyRef(policy_id="hate", version="1.0.0", content_hash="abcd")


def test_harvest_reads_the_topics_and_joins_text_to_labels(kafka_stack, unique_prefix) -> None:
    kafka = KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=2)
    triage = TriageScores(model_version="m1", violation=0.5, categories={}, latency_ms=1.0)
    escalations = [Escalation(item=ContentItem(content_id=f"c{i}", text=f"escalated text {i}"), triage=triage,
                              reason=EscalationReason.AMBIGUOUS, policy_ids=["hate"], ingested_at=T0)
                   for i in range(3)]
    call = ReasonerCall(policy=HATE, model="m", effort=Effort.LOW, violation=True, confidence=0.95, latency_ms=1.0)
    verdicts = [Verdict.final("c0", Decision.BLOCK, Stage.REASONER, triage=triage, reasoner_calls=[call],
                              policies=[HATE]),
                Verdict.final("c9", Decision.BLOCK, Stage.REASONER, triage=triage, reasoner_calls=[call],
                              policies=[HATE])]  # no escalation for c9 on the topic: unmatched
    decisions = [ReviewDecision(decision_id="d1", content_id="c1", task_id="t1", action=ReviewAction.DECIDE,
                                actor_id="rev", actor_role="reviewer", decision=Decision.ALLOW, policy_id="hate")]
    names = {"escalations": kafka.topic(kafka.escalations_topic), "verdicts": kafka.topic(kafka.verdicts_topic),
             "decisions": kafka.topic(kafka.decisions_topic), "review_tasks": kafka.topic(kafka.review_topic)}

    async def scenario() -> dict[str, list[bytes]]:
        await ensure_topics(kafka)
        publisher = Publisher(kafka)
        await publisher.start()
        try:
            for model, topic in ((escalations, names["escalations"]), (verdicts, names["verdicts"]),
                                 (decisions, names["decisions"])):
                await publisher.send_many([(topic, m.content_id if hasattr(m, "content_id") else m.item.content_id,
                                            m.to_bytes()) for m in model])
        finally:
            await publisher.stop()
        return await read_topics(kafka, list(names.values()))

    read = asyncio.run(scenario())
    assert len(read[names["escalations"]]) == 3 and len(read[names["verdicts"]]) == 2
    result = harvest(**{key: read[topic] for key, topic in names.items()}, category_policies={"H": "hate"})
    rows = {r["text"]: r for r in result.rows}
    assert set(rows) == {"escalated text 0", "escalated text 1"}
    assert rows["escalated text 0"]["source"] == "reasoner" and rows["escalated text 0"]["label"] == 1
    assert rows["escalated text 1"]["source"] == "review" and rows["escalated text 1"]["categories"] == {"H": 0}
    assert result.counts["unmatched"] == 1
