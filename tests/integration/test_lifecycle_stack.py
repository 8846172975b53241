"""The policy lifecycle on the real stack: the registry in Redis (and its in-memory twin, one suite for both), the
local broker's offsets-for-times, the retroaction slot family in both stores, and a candidate that flips known items
shadowed by the real reasoning handler on Triton's CPU stand-in, then reported and backtested through the CLI.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from datetime import datetime, timedelta, timezone

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from typer.testing import CliRunner

from pipeline.broker import Publisher, ensure_topics
from pipeline.cli import app
from pipeline.codec import Record
from pipeline.config import PROJECT_ROOT, KafkaSettings, RedisSettings, load_settings
from pipeline.effects import Effects
from pipeline.handlers import ReasoningHandler
from pipeline.lifecycle.history import read_all
from pipeline.lifecycle.live import open_live
from pipeline.lifecycle.promote import Lifecycle
from pipeline.lifecycle.registry import Enforcing, InMemoryPolicyRegistry, RedisPolicyRegistry, ShadowRegistration
from pipeline.lifecycle.shadow import ShadowRunner
from pipeline.policies import PolicyLibrary
from pipeline.reasoner import build_reasoner
from pipeline.schemas import (
    ContentItem,
    Decision,
    Escalation,
    EscalationReason,
    PolicyAction,
    PolicyAudit,
    ShadowResult,
    Stage,
    TriageScores,
    Verdict,
    parse_wire,
)
from pipeline.store import EffectKind, InMemoryStore, RedisStore, item_effect, retro_effect

pytestmark = pytest.mark.integration

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "lifecycle"
# The stand-in's answers on these (measured; deterministic): the base allows pet sales (PW0.c), the candidate
# `no-sales` makes them violations (PW1.d); the rest agree.
SALES = [
    "Selling two kittens, 50 dollars each, message me",
    "Golden retriever puppies for sale, 400 each, both parents on site",
    "Breeder ad: French bulldog puppies available now, price on request",
    "Kittens for sale, 80 each, litter trained",
]
OTHERS = [
    "Took my dog to the vet today, he was very brave",
    "Here is a photo of my cat sleeping on the keyboard",
    "Going to put rat poison out for the cats next door",
    "Cock fight tonight, place your bets",
    "Our shelter has dogs looking for a home, adoption is free",
    "Brushing the dog's fur every evening keeps it shiny",
]


def audit(version: str = "v") -> PolicyAudit:
    return PolicyAudit(audit_id=f"a-{time.time_ns()}", action=PolicyAction.PROMOTE, policy_id="pets", version=version,
                       actor_id="ann")


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_registry_contract(kind: str, kafka_stack, unique_prefix) -> None:  # type: ignore[no-untyped-def]
    async def go() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        registry = RedisPolicyRegistry(store) if kind == "redis" else InMemoryPolicyRegistry()
        try:
            await scenario(registry)
        finally:
            await store.close()

    asyncio.run(go())


async def scenario(registry) -> None:  # type: ignore[no-untyped-def]
    """The registry contract, the same for both implementations."""
    assert await registry.enforcing() == {}
    first = Enforcing("pets", "v2", ("v1",), 10.0, "c1", "ann")
    assert await registry.change_enforcing(first, None, audit("v2"))
    assert not await registry.change_enforcing(Enforcing("pets", "v3"), None, audit("v3"))  # saw no pointer: stale
    assert not await registry.change_enforcing(Enforcing("pets", "v3"), "v1", audit("v3"))
    assert (await registry.enforcing())["pets"] == first
    assert await registry.change_enforcing(Enforcing("pets", "v1", (), 11.0, "c2", "bob"), "v2", audit("v1"))
    assert [a.version for a in await registry.history("pets")] == ["v2", "v1"]
    outbox = await registry.outbox()
    assert [a.version for a in outbox] == ["v2", "v1"]
    await registry.published(outbox[0].audit_id)
    assert [a.version for a in await registry.outbox()] == ["v1"]
    await registry.put_text("pets", "v9", "the text", "policy.md")
    stored = await registry.text("pets", "v9")
    assert (stored.text, stored.file_name) == ("the text", "policy.md")
    assert await registry.text("pets", "nope") is None
    await registry.set_shadow(ShadowRegistration("pets", "v9", 0.5, 1.0, "ann"), audit("v9"))
    await registry.set_shadow(ShadowRegistration("pets:odd", "v8", None, 2.0, "ann"), audit("v8"))
    assert [(r.policy_id, r.version, r.sample) for r in await registry.shadows()] == [
        ("pets", "v9", 0.5), ("pets:odd", "v8", None)]
    assert await registry.stop_shadow("pets", "v9", audit("v9"))
    assert not await registry.stop_shadow("pets", "v9", audit("v9"))
    await registry.put_report("pets", "v9", "backtest", {"compared": 3})
    await registry.put_report("pets", "v9", "shadow", {"compared": 1})
    assert await registry.reports("pets", "v9") == {"backtest": {"compared": 3}, "shadow": {"compared": 1}}
    await registry.record_audit(audit("v9"))
    assert len(await registry.history("pets")) == 6  # two changes, two shadow starts, a stop, the audit
    await registry.report_loaded("w1", {"enforcing": {"pets": "v1"}}, now=100.0)
    await registry.report_loaded("w2", {"enforcing": {"pets": "v2"}}, now=50.0)
    assert await registry.loaded(30.0, now=110.0) == {"w1": {"enforcing": {"pets": "v1"}}}
    assert await registry.loaded(300.0, now=110.0) == {"w1": {"enforcing": {"pets": "v1"}}}  # w2 forgotten


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_a_retroaction_slot_never_collides_with_the_items_own(kind: str, kafka_stack,  # type: ignore[no-untyped-def]
                                                              unique_prefix) -> None:
    async def go() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix)) if kind == "redis" \
            else InMemoryStore()
        original = Verdict.final("x", Decision.ALLOW, Stage.REASONER)
        retro = Verdict.final("x", Decision.BLOCK, Stage.REASONER, supersedes=original.verdict_id)
        assert (await store.record(EffectKind.FINAL, item_effect("x", 1), original.to_bytes(), original)).created
        assert (await store.record(EffectKind.FINAL, retro_effect("x", 1, "pets", "v2"), retro.to_bytes())).created
        assert (await store.recorded(EffectKind.FINAL, item_effect("x", 1))).payload == original.to_bytes()
        assert (await store.visibility("x")).verdict.verdict_id == original.verdict_id  # recording moved nothing
        assert await store.visibility_after_appeal("x", retro, original.verdict_id)
        assert (await store.visibility("x")).verdict.verdict_id == retro.verdict_id
        again = await store.record(EffectKind.FINAL, retro_effect("x", 1, "pets", "v2"), b"other")
        assert not again.created and again.payload == retro.to_bytes()  # a second run gets the first run's verdict
        await store.close()

    asyncio.run(go())


def test_the_local_brokers_offsets_for_times_and_a_window_read(kafka_stack, unique_prefix) -> None:  # type: ignore[no-untyped-def]
    """Tansu answers offsets-for-times with offset 0 for any time (it does not search) and reports a log end behind
    the log after batched writes; the window read must give exactly the records of the window anyway."""
    kafka = KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=2)
    topic = kafka.topic("window")

    async def go() -> None:
        from aiokafka.admin import AIOKafkaAdminClient, NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 2, 1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        t0 = int(time.time() * 1000) - 60_000
        for i in range(12):
            await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i % 5}".encode(), timestamp_ms=t0 + i * 1000)
        # Batched writes: after these, the log end Tansu reports (ListOffsets) is behind the log (measured).
        await asyncio.gather(*(producer.send_and_wait(topic, f"b{i}".encode(), key=f"k{i}".encode(),
                                                      timestamp_ms=t0 + 30_000) for i in range(60)))
        await producer.stop()
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None)
        await consumer.start()
        tps = [TopicPartition(topic, p) for p in (0, 1)]
        answers = await consumer.offsets_for_times({tp: t0 + 5500 for tp in tps})
        await consumer.stop()
        # Tansu 0.6 answers (0, -1) here instead of the first offset at or after the time; whatever a broker
        # answers, the window below must be exact (an implausible answer only means reading from the log start).
        assert set(answers) == set(tps)
        since = datetime.fromtimestamp((t0 + 3000) / 1000, timezone.utc)
        until = datetime.fromtimestamp((t0 + 8000) / 1000, timezone.utc)
        got = await read_all(kafka, topic, since, until)
        assert sorted(r.value for r in got) == sorted(f"v{i}".encode() for i in range(3, 8))
        assert len(await read_all(kafka, topic)) == 72  # every record, whatever the reported log end says

    asyncio.run(go())


# -- a candidate that flips known items: shadowed live, reported, backtested --------------------------------------------


@pytest.fixture
def lifecycle_env(local_stack, unique_prefix, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    """The shipped policies plus the test policy `pets`, private topics and keys; what the CLI reads too."""
    policies = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", policies)
    shutil.copytree(FIXTURES / "pets", policies / "pets")
    monkeypatch.setenv("MODPIPE_STATE_DIR", str(local_stack.state_dir))
    monkeypatch.setenv("MODPIPE_KAFKA__TOPIC_PREFIX", unique_prefix)
    monkeypatch.setenv("MODPIPE_REDIS__KEY_PREFIX", unique_prefix)
    monkeypatch.setenv("MODPIPE_REASONER__POLICIES_DIR", str(policies))
    monkeypatch.setenv("MODPIPE_LIFECYCLE__SHADOW_SAMPLE", "1.0")
    monkeypatch.setenv("MODPIPE_LIFECYCLE__SHADOW_CALLS_PER_S", "100")
    return load_settings()


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_a_flipping_candidate_is_shadowed_reported_and_backtested(lifecycle_env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = lifecycle_env
    kafka = settings.kafka
    texts = SALES + OTHERS
    items = [ContentItem(content_id=f"it-{i}", text=t, policy_ids=["pets"]) for i, t in enumerate(texts)]
    sale_ids = {f"it-{i}" for i in range(len(SALES))}
    started = datetime.now(timezone.utc) - timedelta(seconds=1)

    async def enforce_and_shadow() -> str:
        await ensure_topics(kafka)
        store = RedisStore(settings.redis)
        publisher = Publisher(kafka)
        await publisher.start()
        registry = RedisPolicyRegistry(store)
        base = PolicyLibrary.from_settings(settings.reasoner)
        lc = Lifecycle(settings, registry, publisher, base, store=store)
        candidate = await lc.shadow_start("pets", "no-sales", "ann", "try the sales ban")
        live = await open_live(base, registry, settings.lifecycle, settings.reasoner, shadowing=True)
        reasoner = build_reasoner(settings, live.library)
        effects = Effects(kafka, store, publisher)
        runner = ShadowRunner(reasoner, live, publisher, kafka.topic(kafka.shadow_topic), settings.lifecycle)
        handler = ReasoningHandler(reasoner, live.library, effects, shadow=runner)
        incoming = kafka.topic(kafka.incoming_topic)
        await reasoner.start()
        try:
            for n, item in enumerate(items):
                await publisher.send(incoming, item.content_id, item.to_bytes())  # what the backtest replays
                scores = TriageScores(model_version="t", violation=0.3, categories={}, latency_ms=1.0)
                esc = Escalation(item=item, triage=scores, reason=EscalationReason.AMBIGUOUS, policy_ids=["pets"],
                                 ingested_at=datetime.now(timezone.utc))
                await publisher.send(kafka.topic(kafka.escalations_topic), item.content_id, esc.to_bytes())
                await handler.handle(Record(kafka.topic(kafka.escalations_topic), 0, n, None, esc.to_bytes(),
                                            int(time.time() * 1000)))
            await runner.drain(120)
        finally:
            await reasoner.close()
            await publisher.stop()
            await store.close()
        return candidate.version

    version = asyncio.run(enforce_and_shadow())
    shadows = [parse_wire(ShadowResult, r.value) for r in asyncio.run(read_all(kafka, kafka.topic(kafka.shadow_topic)))]
    assert {s.content_id for s in shadows} == {i.content_id for i in items}
    flipped = {s.content_id for s in shadows if s.violation and s.enforced_violation is False}
    assert flipped == sale_ids and all(s.rule_ids == ["PW1.d"] for s in shadows if s.content_id in flipped)

    out = cli("policy", "shadow-report", "pets", "--json-out", str(tmp_path / "shadow.json"),
              "--plot", str(tmp_path / "shadow.png"))
    report = json.loads((tmp_path / "shadow.json").read_text())
    assert report["candidate"] == version and report["compared"] == len(items)
    assert report["flips"]["to_violation"]["count"] == len(SALES) and report["flips"]["to_allowed"]["count"] == 0
    assert {e["content_id"] for e in report["flips"]["to_violation"]["examples"]} == sale_ids
    assert report["rules"]["to_violation"] == {"PW1.d": len(SALES)} and report["cost"]["calls"] >= len(items)
    assert "flips to violation 4" in out and (tmp_path / "shadow.png").stat().st_size > 1000

    run_dir = tmp_path / "bt"
    dry = cli("policy", "backtest", "pets", "--candidate", "no-sales", "--from", started.isoformat(),
              "--out", str(run_dir), "--dry-run")
    assert "estimate:" in dry and not (run_dir / "results.jsonl").exists()
    cli("policy", "backtest", "pets", "--candidate", version[:8], "--from", started.isoformat(), "--out", str(run_dir),
        "--all-items", "--yes")
    backtest = json.loads((run_dir / "report.json").read_text())
    assert backtest["compared"] == len(items) and backtest["flips"]["to_violation"]["count"] == len(SALES)
    assert {e["content_id"] for e in backtest["flips"]["to_violation"]["examples"]} == sale_ids
    # The first-effort answers come from the verdict cache the shadow run filled (keyed by version); what the real
    # triage scores make contradictory is asked again at high effort (scores under 0.1 against a violation).
    assert backtest["cost"]["cached_calls"] == len(items)
    assert backtest["cost"]["model_calls"] == backtest["cost"]["by_effort"].get("high", 0)
    assert (run_dir / "summary.txt").exists() and (run_dir / "report.png").exists()
    rerun = cli("policy", "backtest", "pets", "--candidate", version, "--from", started.isoformat(),
                "--out", str(run_dir), "--all-items", "--yes")
    assert "0 items for the candidate" in rerun.replace("\n", " ")  # resumed: nothing left to judge
    versions = cli("policy", "versions", "pets", "--json-out", str(tmp_path / "versions.json"))
    rows = {r["version"]: r for r in json.loads((tmp_path / "versions.json").read_text())["versions"]}
    assert set(rows[version]["reports"]) == {"backtest", "shadow"} and "no-sales" in versions
    verdicts = [parse_wire(Verdict, r.value) for r in asyncio.run(read_all(kafka, kafka.topic(kafka.verdicts_topic)))]
    assert len(verdicts) == len(items)  # the backtest and the shadow published no verdict


def test_the_review_service_follows_a_promotion_without_a_restart(lifecycle_env, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Reviewers see, and cite rules of, the version the registry says enforces: a candidate's new rule becomes
    citable once it is promoted, while the service keeps running."""
    from pipeline.policies.versions import version_files
    from pipeline.review.service import ReviewService

    monkeypatch.setenv("MODPIPE_LIFECYCLE__REFRESH_S", "0.2")
    settings = load_settings()
    base, candidate = version_files(settings.reasoner.policies_dir / "pets")

    async def go() -> None:
        service = ReviewService(settings)
        await service.start(background=False)
        store = RedisStore(settings.redis)
        try:
            assert service.library.get("pets").version == base.version
            assert "PW1.d" not in service.library.get("pets").rule_ids  # the candidate's new rule
            promoted = Enforcing("pets", candidate.version, (base.version,), time.time(), "c1", "ann")
            assert await RedisPolicyRegistry(store).change_enforcing(promoted, None, audit(candidate.version))
            deadline = time.monotonic() + 10
            while service.library.get("pets").version != candidate.version and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert service.library.get("pets").version == candidate.version
            assert "PW1.d" in service.library.get("pets").rule_ids
            assert {p["policy_id"]: p for p in service.policy_catalogue()}["pets"]["rules"]
        finally:
            await service.stop()
            await store.close()

    asyncio.run(go())
