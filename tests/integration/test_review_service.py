"""The review service against a real broker and a private Redis: queues, claims, decisions, appeals, access."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest

from pipeline.config import KafkaSettings, RedisSettings, ReviewSettings, Settings
from pipeline.broker import ensure_topics
from pipeline.codec import Record
from pipeline.store.keys import Namespace
from pipeline.effects import Effects
from pipeline.handlers import ReviewIntakeHandler
from pipeline.review.auth import Role, token_hash
from pipeline.review.service import ReviewService
from pipeline.review.feedback import validate_example
from pipeline.review.queue import severities_from
from pipeline.review.api import create_app
from pipeline.harness.review import read_topic, sample_task, wait_for
from pipeline.schemas import Decision, ReviewDecision, ReviewTask, Stage, Verdict, VerdictStatus
from pipeline.store import EffectKind, appeal_effect, item_effect

pytestmark = pytest.mark.integration

ADMIN = "admin-bootstrap-token-for-tests"


def on_platform(task: ReviewTask, platform: str) -> ReviewTask:
    """The task of an item that ``platform`` published (platform tokens read and appeal only their own items)."""
    return task.model_copy(update={"item": task.item.model_copy(update={"platform": platform})})


@pytest.fixture
def settings(kafka_stack, unique_prefix, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=1),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
        review=ReviewSettings(admin_token=ADMIN, claim_ttl_s=60),
    )


@dataclass
class Env:
    service: ReviewService
    http: httpx.AsyncClient
    tokens: dict[str, str]

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Env]:
    await ensure_topics(settings.kafka)
    service = ReviewService(settings, relay_interval_s=0.05)
    await service.start()
    app = create_app(settings, service)
    tokens = {"admin": ADMIN}
    for who, role in (("alice", Role.REVIEWER), ("bob", Role.REVIEWER), ("carol", Role.REVIEWER),
                      ("shop", Role.PLATFORM)):
        tokens[who] = await service.tokens.create(who, role)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://review") as http:
            yield Env(service, http, tokens)
    finally:
        await service.stop()


def test_claims_follow_severity_then_age_and_are_exclusive(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            sev = severities_from(env.service.library)
            critical = next(p for p, s in sev.items() if s == "critical")
            high = next(p for p, s in sev.items() if s == "high")
            q = env.service.queue
            assert await q.enqueue(sample_task("high-old", policy_ids=(high,), age_s=300))
            assert await q.enqueue(sample_task("high-new", policy_ids=(high,), age_s=10))
            assert await q.enqueue(sample_task("crit-new", policy_ids=(critical,), age_s=5))
            assert not await q.enqueue(sample_task("high-old", policy_ids=(high,)))  # redelivered: no duplicate
            order = [(await q.claim(f"r{i}", 60)) for i in range(4)]
            assert [c.content_id if c else None for c in order] == ["crit-new", "high-old", "high-new", None]
            counts, claimed = await q.counts()
            assert claimed == 3 and sum(c.pending for c in counts) == 0

            for i in range(30):
                await q.enqueue(sample_task(f"burst-{i}", policy_ids=(high,)))
            claims = await asyncio.gather(*(q.claim(f"reviewer-{i}", 60) for i in range(60)))
            got = [c.content_id for c in claims if c]
            assert len(got) == 30 and len(set(got)) == 30  # every item once, nobody shares one

    asyncio.run(scenario())


def test_expired_lease_returns_the_item_and_voids_the_old_holder(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            q = env.service.queue
            await q.enqueue(sample_task("lease-1"))
            t0 = time.time()  # times ahead of the clock: the service's own reaper must not interfere
            first = await q.claim("alice", 10, now=t0)
            assert first and first.content_id == "lease-1"
            assert await q.claim("bob", 10, now=t0 + 5) is None  # still held
            second = await q.claim("bob", 10, now=t0 + 11)  # alice's lease ran out
            assert second and second.content_id == "lease-1"
            entry = ReviewDecision(decision_id="d", content_id="lease-1", task_id="t", action="decide",
                                   actor_id="alice", actor_role="reviewer")
            outcome, _, _ = await q.record_decision("lease-1", "alice", "{}", entry, now=t0 + 12)
            assert outcome.value == "not_held"

    asyncio.run(scenario())


def test_every_request_needs_a_valid_token_and_tokens_are_stored_hashed(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            for method, path in (("GET", "/v1/queues"), ("POST", "/v1/claims"), ("GET", "/v1/content/x"),
                                 ("POST", "/v1/appeals"), ("GET", "/v1/stats"), ("GET", "/v1/export"),
                                 ("POST", "/v1/items/x/decision")):
                assert (await env.http.request(method, path)).status_code == 401, path
                bad = await env.http.request(method, path, headers={"Authorization": "Bearer mpr_nope"})
                assert bad.status_code == 401, path
            assert (await env.http.get("/", follow_redirects=False)).status_code == 303
            stored = await env.service.store.redis.hgetall(env.service.store.key(Namespace.REVIEW_TOKENS))
            assert token_hash(env.tokens["alice"]).encode() in stored
            assert not any(env.tokens["alice"].encode() in k + v for k, v in stored.items())
            # A platform reads visibility and files appeals, but cannot review.
            assert (await env.http.post("/v1/claims", headers=env.auth("shop"))).status_code == 403
            assert (await env.http.get("/v1/export", headers=env.auth("alice"))).status_code == 403

    asyncio.run(scenario())


def test_decision_publishes_verdict_audit_and_visibility(settings: Settings, caplog) -> None:  # type: ignore[no-untyped-def]
    secret_text = "SENTINEL-CONTENT-7f3a never log me"

    async def scenario() -> None:
        async with running(settings) as env:
            svc = env.service
            # The item was hidden by triage, then sent to review (the provisional verdict goes through the ledger).
            provisional = Verdict(verdict_id="prov-1", content_id="dec-1", status=VerdictStatus.PROVISIONAL,
                                  decision=Decision.HIDE_PENDING, stage=Stage.TRIAGE, platform="shop")
            await svc.effects.verdict(provisional)
            shown = await env.http.get("/v1/content/dec-1", headers=env.auth("shop"))
            assert shown.status_code == 200 and shown.json()["state"] == "HIDDEN_PENDING"
            assert "hidden_for_s" in shown.json()
            assert (await env.http.get("/v1/content/nope", headers=env.auth("shop"))).status_code == 404

            await svc.queue.enqueue(on_platform(sample_task("dec-1", text=secret_text, model_says=False), "shop"))
            claim = await env.http.post("/v1/claims", headers=env.auth("alice"), json={})
            assert claim.status_code == 200
            view = claim.json()
            assert view["content_id"] == "dec-1" and secret_text not in claim.text  # text only on demand
            assert view["model"]["generated_by_model"] is True
            assert any(r["cited"] for r in view["policies"][0]["rules"])
            body = {"decision": "remove", "policy_id": "hate", "rule_id": "HT1.b", "note": "contempt"}
            # bob does not hold it: 409, and nothing is published
            assert (await env.http.post("/v1/items/dec-1/decision", headers=env.auth("bob"), json=body)).status_code == 409
            assert (await env.http.get("/v1/items/dec-1/content", headers=env.auth("bob"))).status_code == 409
            text = await env.http.get("/v1/items/dec-1/content", headers=env.auth("alice"))
            assert text.json()["text"] == secret_text
            bad_rule = {**body, "rule_id": "HT0.a"}
            assert (await env.http.post("/v1/items/dec-1/decision", headers=env.auth("alice"), json=bad_rule)).status_code == 422
            decided = await env.http.post("/v1/items/dec-1/decision", headers=env.auth("alice"), json=body)
            assert decided.status_code == 200, decided.text
            verdict = Verdict.model_validate(decided.json())
            assert verdict.stage is Stage.REVIEW and verdict.reviewer_id == "alice" and verdict.rule_ids == ["HT1.b"]
            # A retried request gets the same verdict back; a second reviewer gets 409.
            again = await env.http.post("/v1/items/dec-1/decision", headers=env.auth("alice"), json=body)
            assert again.status_code == 200 and again.json()["verdict_id"] == verdict.verdict_id
            assert (await env.http.post("/v1/items/dec-1/decision", headers=env.auth("bob"), json=body)).status_code == 409

            vis = (await env.http.get("/v1/content/dec-1", headers=env.auth("shop"))).json()
            assert vis["state"] == "REMOVED" and vis["verdict"]["verdict_id"] == verdict.verdict_id

            kafka = settings.kafka
            finals = await read_topic(kafka, kafka.topic(kafka.verdicts_topic),
                                      lambda vs: any(b'"stage":"review"' in v for v in vs))
            review_finals = [Verdict.model_validate_json(v) for v in finals if b'"stage":"review"' in v]
            assert [v.verdict_id for v in review_finals] == [verdict.verdict_id]
            audit = await read_topic(kafka, kafka.topic(kafka.decisions_topic), lambda vs: len(vs) >= 1)
            entry = ReviewDecision.model_validate_json(audit[0])
            assert entry.actor_id == "alice" and entry.verdict_id == verdict.verdict_id
            assert entry.model_violation is False and entry.model_source == "reasoner"

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert secret_text not in caplog.text
    assert "dec-1" in caplog.text  # the log does talk about the item, by id


def test_appeal_requeues_with_history_for_another_reviewer(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            svc = env.service
            await svc.queue.enqueue(on_platform(sample_task("ap-1", model_says=True), "shop"))
            assert (await env.http.post("/v1/claims", headers=env.auth("alice"))).json()["content_id"] == "ap-1"
            first = (await env.http.post("/v1/items/ap-1/decision", headers=env.auth("alice"),
                                         json={"decision": "remove", "policy_id": "hate", "rule_id": "HT1.a"})).json()
            # An appeal before any decision, or for an unknown item, is refused; reviewers cannot file appeals.
            assert (await env.http.post("/v1/appeals", headers=env.auth("shop"),
                                        json={"content_id": "never-seen"})).status_code == 409
            assert (await env.http.post("/v1/appeals", headers=env.auth("alice"),
                                        json={"content_id": "ap-1"})).status_code == 403
            filed = await env.http.post("/v1/appeals", headers=env.auth("shop"),
                                        json={"content_id": "ap-1", "reason": "it was a quote"})
            assert filed.status_code == 202, filed.text
            assert filed.json() == {"content_id": "ap-1", "revision": 1, "appeal_round": 1,
                                    "supersedes": first["verdict_id"], "excluded_reviewer": "alice"}
            assert (await env.http.post("/v1/appeals", headers=env.auth("shop"),
                                        json={"content_id": "ap-1"})).status_code == 409  # already open
            assert (await env.http.post("/v1/claims", headers=env.auth("alice"))).status_code == 204
            view = (await env.http.post("/v1/claims", headers=env.auth("bob"))).json()
            assert view["content_id"] == "ap-1" and view["appeal_round"] == 1
            assert view["supersedes"]["verdict_id"] == first["verdict_id"]
            assert [h["action"] for h in view["history"]] == ["decide", "appeal"]
            second = (await env.http.post("/v1/items/ap-1/decision", headers=env.auth("bob"),
                                          json={"decision": "allow", "policy_id": "hate", "rule_id": "HT0.a"})).json()
            assert second["supersedes"] == first["verdict_id"] and second["decision"] == "allow"
            vis = (await env.http.get("/v1/content/ap-1", headers=env.auth("shop"))).json()
            assert vis["state"] == "VISIBLE" and vis["verdict"]["verdict_id"] == second["verdict_id"]
            # The first final verdict stays recorded as it was; the appeal outcome has its own ledger entry.
            original = await svc.store.recorded(EffectKind.FINAL, item_effect("ap-1", 1))
            assert Verdict.model_validate_json(original.payload).verdict_id == first["verdict_id"]
            outcome = await svc.store.recorded(EffectKind.FINAL, appeal_effect("ap-1", 1, 1))
            assert outcome.published and Verdict.model_validate_json(outcome.payload).verdict_id == second["verdict_id"]
            # Replaying the first round's publication cannot move visibility back.
            await svc._publish_decision(Verdict.model_validate_json(original.payload), 0)
            assert (await svc.store.visibility("ap-1")).verdict.verdict_id == second["verdict_id"]

            # Items decided without review can be appealed when the platform sends the item.
            auto = Verdict(verdict_id="auto-1", content_id="ap-2", status=VerdictStatus.FINAL, decision=Decision.BLOCK,
                           stage=Stage.TRIAGE, platform="shop")
            await svc.effects.verdict(auto)
            assert (await env.http.post("/v1/appeals", headers=env.auth("shop"),
                                        json={"content_id": "ap-2"})).status_code == 422
            item = {"content_id": "ap-2", "text": "appealed text", "policy_ids": ["hate"]}
            assert (await env.http.post("/v1/appeals", headers=env.auth("shop"),
                                        json={"content_id": "ap-2", "item": item})).status_code == 202
            view = (await env.http.post("/v1/claims", headers=env.auth("alice"))).json()
            assert view["content_id"] == "ap-2" and view["reason"] == "appeal"

            kafka = settings.kafka
            finals = await read_topic(kafka, kafka.topic(kafka.verdicts_topic), lambda vs: len(vs) >= 3)
            assert {Verdict.model_validate_json(v).verdict_id for v in finals} >= {first["verdict_id"], second["verdict_id"]}

    asyncio.run(scenario())


def test_skip_and_escalate_route_the_item(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            await env.service.queue.enqueue(sample_task("sk-1"))
            assert (await env.http.post("/v1/claims", headers=env.auth("alice"))).json()["content_id"] == "sk-1"
            assert (await env.http.post("/v1/items/sk-1/skip", headers=env.auth("bob"))).status_code == 409
            assert (await env.http.post("/v1/items/sk-1/skip", headers=env.auth("alice"))).status_code == 200
            assert (await env.http.post("/v1/claims", headers=env.auth("alice"))).status_code == 204  # skipped it
            assert (await env.http.post("/v1/claims", headers=env.auth("bob"))).json()["content_id"] == "sk-1"
            esc = await env.http.post("/v1/items/sk-1/escalate", headers=env.auth("bob"), json={"note": "unsure"})
            assert esc.status_code == 200
            queues = (await env.http.get("/v1/queues", headers=env.auth("carol"))).json()
            assert {"queue": "admin", "pending": 1} .items() <= next(q for q in queues["queues"] if q["queue"] == "admin").items()
            assert (await env.http.post("/v1/claims", headers=env.auth("carol"))).status_code == 204  # reviewers: no
            held = await env.http.post("/v1/claims", headers={"Authorization": f"Bearer {ADMIN}"})
            assert held.json()["content_id"] == "sk-1" and held.json()["queue"] == "admin"

    asyncio.run(scenario())


def test_stats_and_export_feed_back_to_triage(settings: Settings, tmp_path) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> tuple[dict, list[dict]]:
        async with running(settings) as env:
            q = env.service.queue
            # model says violation on all three; people remove one, allow two: 2 of 3 model verdicts overturned
            for i, text in enumerate(["first text", "second text", "third text"]):
                await q.enqueue(sample_task(f"st-{i}", text=text, model_says=True, age_s=10 - i))
            for decision, rule in (("remove", "HT1.b"), ("allow", None), ("allow", "HT0.c")):
                cid = (await env.http.post("/v1/claims", headers=env.auth("alice"))).json()["content_id"]
                r = await env.http.post(f"/v1/items/{cid}/decision", headers=env.auth("alice"),
                                        json={"decision": decision, "policy_id": "hate", "rule_id": rule})
                assert r.status_code == 200, r.text
            stats = (await env.http.get("/v1/stats", headers=env.auth("bob"))).json()
            export = await env.http.get("/v1/export", headers={"Authorization": f"Bearer {ADMIN}"})
            assert export.status_code == 200
            return stats, [json.loads(line) for line in export.text.splitlines()]

    stats, examples = asyncio.run(scenario())
    assert stats["decisions"] == 3
    assert stats["model_verdicts"] == {"compared": 3, "overturned": 2, "overturn_rate": round(2 / 3, 4)}
    assert stats["agreement_per_policy"]["hate"] == {"compared": 3, "agreed": 1, "rate": round(1 / 3, 4)}
    assert sorted((e["text"], e["label"]) for e in examples) == [
        ("first text", 1), ("second text", 0), ("third text", 0)]
    for example in examples:
        validate_example(example)
        assert example["source"] == "review" and example["policy_id"] == "hate"
    allowed = next(e for e in examples if e["text"] == "second text")
    assert allowed["rule_id"] is None and set(allowed.get("categories", {}).values()) <= {0}
    # What `modpipe triage train --feedback` reads accepts the export as written.
    from triage_models.data import load_feedback

    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    loaded = load_feedback(path)
    assert sorted(zip(loaded.texts, loaded.any_override.tolist())) == [
        ("first text", 1), ("second text", 0), ("third text", 0)]


def test_intake_worker_handler_fills_the_queue_once(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            svc = env.service
            handler = ReviewIntakeHandler(svc.store, svc.queue, Effects(settings.kafka, svc.store, svc.publisher))
            task = sample_task("in-1")
            record = Record(topic="t", partition=0, offset=1, key=b"in-1", value=task.to_bytes(), timestamp_ms=None)
            await handler.handle(record)
            await handler.handle(record)  # redelivery
            counts, _ = await svc.queue.counts()
            assert sum(c.pending for c in counts) == 1
            assert [t.item.content_id for t in await svc.queue.pending()] == ["in-1"]
            # An item with a final verdict already is not queued again.
            done = Verdict(verdict_id="v", content_id="in-2", status=VerdictStatus.FINAL, decision=Decision.ALLOW,
                           stage=Stage.REASONER)
            await svc.effects.verdict(done)
            late = sample_task("in-2")
            await handler.handle(Record("t", 0, 2, b"in-2", late.to_bytes(), None))
            assert await svc.queue.pending_count() == 1
            assert await wait_for(lambda: True)

    asyncio.run(scenario())
