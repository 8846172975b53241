"""Helpers shared by the review tests, the bench and demos: sample review tasks and a topic reader.

Kept in the package next to the real thing so the tests and ``modpipe bench review`` build the same items.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from aiokafka import AIOKafkaConsumer

from pipeline.config import KafkaSettings
from pipeline.schemas import (
    ContentItem,
    Effort,
    PolicyRef,
    ReasonerCall,
    ReviewReason,
    ReviewTask,
    TriageScores,
)


def sample_task(content_id: str, *, text: str = "sample text under review", policy_ids: tuple[str, ...] = ("hate",),
                model_says: bool | None = True, cited: tuple[str, ...] = ("HT1.b",), age_s: float = 0.0,
                reason: ReviewReason = ReviewReason.EDGE_CASE) -> ReviewTask:
    """A review task as the reasoning worker would send it; ``model_says`` None means the model failed."""
    created = datetime.now(timezone.utc) - timedelta(seconds=age_s)
    item = ContentItem(content_id=content_id, text=text, created_at=created)
    calls = [
        ReasonerCall(
            policy=PolicyRef(policy_id=pid, version="1.0.0", content_hash="0" * 16),
            model="safeguard_standin_cpu",
            effort=Effort.HIGH,
            violation=model_says,
            confidence=None if model_says is None else 0.55,
            rule_ids=list(cited) if model_says is not None and i == 0 else [],
            rationale="" if model_says is None else "borderline wording (stand-in model)",
            error="reasoner unavailable" if model_says is None else None,
            latency_ms=12.0,
        )
        for i, pid in enumerate(policy_ids)
    ]
    return ReviewTask(
        task_id=uuid.uuid4().hex,
        item=item,
        triage=TriageScores(model_version="test", violation=0.5, categories={"H": 0.4, "HR": 0.2}, latency_ms=3.0),
        reason=reason,
        policy_ids=list(policy_ids),
        reasoner_calls=calls,
        ingested_at=created,
        created_at=created,
    )


async def read_topic(kafka: KafkaSettings, topic: str, done: Callable[[list[bytes]], bool],
                     timeout_s: float = 30.0) -> list[bytes]:
    """Read ``topic`` from the beginning until ``done(values)`` is true or the timeout passes."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka.bootstrap_servers, auto_offset_reset="earliest", enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    values: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    try:
        while not done(values) and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                values.extend(r.value for r in records if r.value is not None)
    finally:
        await consumer.stop()
    return values


async def wait_for(predicate: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return True
        await asyncio.sleep(interval_s)
    return False
