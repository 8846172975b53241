"""A real worker process serves Prometheus metrics: scrape it over HTTP and check the names the dashboards use.

The worker is ``review-intake`` (the lightest role: Kafka and Redis only), started as an operator would
(``modpipe worker --role review-intake`` in its own process, via :class:`pipeline.harness.Workers`) with
``MODPIPE_WORKER__METRICS_PORT`` set. It handles one valid review task and one malformed message, so the scrape
must show them counted, not only declared.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.app import Role
from pipeline.config import Settings
from pipeline.deploy_check import defined_metric_names
from pipeline.harness.workers import Workers
from pipeline.broker import Publisher, ensure_topics
from pipeline.schemas import ContentItem, ReviewReason, ReviewTask, TriageScores
from pipeline.stack import free_port

pytestmark = pytest.mark.integration

# What the Grafana dashboard and docs/OPERATIONS.md rely on, by family name (as the text format declares them).
EXPECTED_FAMILIES = {
    "modpipe_messages_total": "counter",
    "modpipe_verdicts_total": "counter",
    "modpipe_escalations_total": "counter",
    "modpipe_review_tasks_total": "counter",
    "modpipe_dead_letters_total": "counter",
    "modpipe_retries_total": "counter",
    "modpipe_redeliveries_total": "counter",
    "modpipe_cache_requests_total": "counter",
    "modpipe_triage_latency_seconds": "histogram",
    "modpipe_triage_batch_size": "histogram",
    "modpipe_reasoner_latency_seconds": "histogram",
    "modpipe_verdict_latency_seconds": "histogram",
    "modpipe_time_hidden_seconds": "histogram",
    "modpipe_review_queue_depth": "gauge",
    "modpipe_review_queue_oldest_age_seconds": "gauge",
}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


def _families(text: str) -> dict[str, str]:
    """Family name -> type, as a Prometheus server parses them (counters lose the _total suffix there)."""
    families = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        families[name] = family.type
    return families


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_worker_serves_the_documented_metrics(kafka_stack, unique_prefix, tmp_path: Path) -> None:
    port = free_port()
    env = {
        **kafka_stack.env(),
        "MODPIPE_STATE_DIR": str(kafka_stack.state_dir),
        "MODPIPE_KAFKA__TOPIC_PREFIX": unique_prefix,
        "MODPIPE_REDIS__KEY_PREFIX": unique_prefix,
        "MODPIPE_WORKER__METRICS_PORT": str(port),
    }
    settings = Settings(
        state_dir=kafka_stack.state_dir,
        kafka={"bootstrap_servers": kafka_stack.kafka_bootstrap, "topic_prefix": unique_prefix},
        redis={"url": kafka_stack.redis_url, "key_prefix": unique_prefix},
    )
    asyncio.run(ensure_topics(settings.kafka))
    workers = Workers(settings, env, tmp_path / "logs")
    try:
        workers.start(Role.REVIEW_INTAKE)
        workers.wait_ready(timeout_s=120)
        text = _scrape(port)
        families = _families(text)
        # Every family the code defines is exported, with the documented type, before any traffic.
        for name, kind in EXPECTED_FAMILIES.items():
            assert families.get(name) == kind, f"{name}: {families.get(name)!r}, expected {kind}"
        defined = {n for n in defined_metric_names() if not n.endswith(("_bucket", "_sum", "_count"))}
        assert {n for n in families if n.startswith("modpipe_")} >= {n for n in defined if n in EXPECTED_FAMILIES}

        # Traffic: one valid review task, one malformed message. Both must show up in the scrape.
        item = ContentItem(content_id=f"{unique_prefix}metrics-1", text="metrics scrape test")
        task = ReviewTask(task_id="t-metrics", item=item, triage=TriageScores(model_version="m", violation=0.5, latency_ms=1),
                          reason=ReviewReason.EDGE_CASE, policy_ids=["hate"], ingested_at=item.created_at)
        review_topic = settings.kafka.topic(settings.kafka.review_topic)

        async def publish() -> None:
            publisher = Publisher(settings.kafka)
            await publisher.start()
            try:
                await publisher.send(review_topic, item.content_id, task.to_bytes())
                await publisher.send(review_topic, "broken", b"{not json")
            finally:
                await publisher.stop()

        asyncio.run(publish())
        deadline = time.monotonic() + 60
        while True:
            text = _scrape(port)
            ok = _sample(text, "modpipe_messages_total", stage="review_intake", outcome="ok")
            dead = _sample(text, "modpipe_dead_letters_total", stage="review_intake")
            if (ok >= 1 and dead >= 1) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ok == 1, text
        assert dead == 1, text
        assert _sample(text, "modpipe_messages_total", stage="review_intake") == 2
        # Labels stay bounded: no content id or text in any label value.
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                assert not any(unique_prefix in str(v) or "metrics scrape test" in str(v) for v in sample.labels.values())
    finally:
        workers.stop_all()
