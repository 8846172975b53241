"""The gateway against a real broker and a private Redis, with the triage role's real handler behind it.

The triage worker is :class:`pipeline.gateway.testing.TriagePump` (the real handler and store, a scripted scorer,
the triage consumer group), so what the gateway publishes is judged, verdicts land in the visibility store and the
lag the gateway reads is the real one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpx
import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.broker import ensure_topics
from pipeline.config import GatewaySettings, KafkaSettings, RedisSettings, Settings
from pipeline.gateway.api import create_app
from pipeline.gateway.service import Gateway
from pipeline.gateway.testing import ALLOW, BLOCK_VIOLENCE, ESCALATE, TriagePump
from pipeline.review.auth import Role, TokenStore
from pipeline.schemas import ContentItem, Verdict

pytestmark = pytest.mark.integration

SCRIPT = {
    "good morning everyone": ALLOW,
    "see you at the market": ALLOW,
    "i will hurt you": BLOCK_VIOLENCE,
    "is this a threat?": ESCALATE,
}


@pytest.fixture
def settings(kafka_stack, unique_prefix, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=2,
                            session_timeout_s=2.0, heartbeat_interval_s=0.5),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
        gateway=GatewaySettings(max_batch_items=5, moderate_deadline_ms=5000, max_deadline_ms=8000,
                                poll_interval_ms=20, lag_refresh_s=0.05, max_triage_lag=3),
    )


@dataclass
class Env:
    settings: Settings
    gateway: Gateway
    http: httpx.AsyncClient
    tokens: dict[str, str]
    pump: TriagePump | None

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}


@asynccontextmanager
async def running(settings: Settings, *, pump: bool = True) -> AsyncIterator[Env]:
    await ensure_topics(settings.kafka)
    gateway = Gateway(settings)
    await gateway.start()
    tokens = {}
    store = TokenStore(gateway.store)
    for who, role in (("shop", Role.PLATFORM), ("forum", Role.PLATFORM), ("alice", Role.REVIEWER)):
        tokens[who] = await store.create(who, role)
    triage = TriagePump(settings, SCRIPT) if pump else None
    if triage is not None:
        await triage.start()
        await triage.wait_assigned()
    app = create_app(settings, gateway)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=("10.1.0.1", 50000)),
                                     base_url="http://gateway") as http:
            yield Env(settings, gateway, http, tokens, triage)
    finally:
        if triage is not None:
            await triage.stop()
        await gateway.stop()


async def incoming(settings: Settings, expect: int, timeout_s: float = 10.0) -> list[ContentItem]:
    """What reached content.incoming (read from the start, outside any group)."""
    consumer = AIOKafkaConsumer(settings.kafka.topic(settings.kafka.incoming_topic),
                                bootstrap_servers=settings.kafka.bootstrap_servers, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    found: list[ContentItem] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(found) < expect and asyncio.get_running_loop().time() < deadline:
            for messages in (await consumer.getmany(timeout_ms=200)).values():
                for m in messages:
                    item = ContentItem.model_validate_json(m.value)
                    assert m.key == item.content_id.encode()
                    found.append(item)
        # Nothing more than expected arrives.
        for messages in (await consumer.getmany(timeout_ms=300)).values():
            found.extend(ContentItem.model_validate_json(m.value) for m in messages)
    finally:
        await consumer.stop()
    return found


async def wait_state(env: Env, who: str, cid: str, wanted: str, timeout_s: float = 20.0) -> dict:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        answer = await env.http.get(f"/v1/items/{cid}", headers=env.auth(who))
        body = answer.json()
        if answer.status_code == 200 and body["state"] == wanted:
            return body
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{cid} never reached {wanted}: {answer.status_code} {body}")
        await asyncio.sleep(0.05)


def test_items_are_published_keyed_by_id_with_the_tokens_platform_and_answered_202(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings, pump=False) as env:
            one = await env.http.post("/v1/items", headers=env.auth("shop"),
                                      json={"content_id": "shop-1", "text": "good morning everyone"})
            assert one.status_code == 202, one.text
            assert one.json() == {"content_id": "shop-1", "status": "accepted", "status_url": "/v1/items/shop-1"}
            assert one.headers["location"] == "/v1/items/shop-1"
            batch = await env.http.post("/v1/items", headers=env.auth("shop"), json={"items": [
                {"content_id": "shop-2", "text": "see you at the market", "platform": "shop"},
                {"content_id": "shop-3", "text": "i will hurt you", "author_id": "u9", "language": "en"},
                {"content_id": "shop-2", "text": "see you at the market"},  # the same item twice: one item
            ]})
            assert batch.status_code == 202, batch.text
            assert batch.json()["accepted"] == 2 and batch.json()["duplicates"] == 0
            published = await incoming(settings, 3)
            assert sorted(i.content_id for i in published) == ["shop-1", "shop-2", "shop-3"]
            assert {i.platform for i in published} == {"shop"}
            # The same id and text again: one item, nothing published.
            again = await env.http.post("/v1/items", headers=env.auth("shop"),
                                        json={"content_id": "shop-1", "text": "good  morning everyone "})
            assert again.status_code == 202 and again.json()["status"] == "duplicate"
            assert len(await incoming(settings, 3)) == 3

    asyncio.run(scenario())


def test_bad_input_is_a_4xx_naming_the_field_and_never_echoing_it(settings: Settings) -> None:
    secret = "s3cr3t-user-text"
    cases = [
        ({"content_id": "bad id!", "text": secret}, "body.content_id"),
        ({"content_id": "x1"}, "body.text"),
        ({"content_id": "x1", "text": secret, "colour": "vermilion-9"}, "body.<key>"),
        ({"content_id": "x1", "text": secret, "platform": "forum"}, "body.platform"),
        ({"content_id": "x1", "text": secret, "policy_ids": ["nope"]}, "body.policy_ids.0"),
        ({"content_id": "x1", "text": "y" * 20_001}, "body.text"),
        ({"items": [{"content_id": "x1", "text": secret}, {"content_id": "x2", "text": 5}]}, "body.items.1.text"),
        ({"items": [{"content_id": "x1", "text": secret}, {"content_id": "x1", "text": "other"}]},
         "body.items.1.content_id"),
        ({"items": [{"content_id": f"x{i}", "text": secret} for i in range(6)]}, "body.items"),
        ({"items": []}, "body.items"),
    ]

    async def scenario() -> None:
        async with running(settings, pump=False) as env:
            for body, field in cases:
                answer = await env.http.post("/v1/items", headers=env.auth("shop"), json=body)
                assert answer.status_code == 422, (field, answer.text)
                assert field in [f["field"] for f in answer.json()["fields"]], (field, answer.text)
                assert secret not in answer.text and "vermilion" not in answer.text
            raw = [b'{"content_id": "x1", "text": "\\ud800"}', b"[" * 5000 + b"]" * 5000, b"{not json", b""]
            for body in raw:
                answer = await env.http.post("/v1/items", headers={**env.auth("shop"),
                                                                    "content-type": "application/json"}, content=body)
                assert answer.status_code == 422, answer.text
            too_big = await env.http.post("/v1/moderate", headers=env.auth("shop"),
                                          content=b'{"content_id": "x1", "text": "' + b"a" * 300_000 + b'"}')
            assert too_big.status_code == 413
            assert await incoming(settings, 0, timeout_s=0.5) == []

    asyncio.run(scenario())


def test_platform_tokens_only_and_failed_guesses_are_limited(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings, pump=False) as env:
            body = {"content_id": "t1", "text": "good morning everyone"}
            assert (await env.http.post("/v1/items", json=body)).status_code == 401
            assert (await env.http.post("/v1/items", json=body, headers=env.auth("alice"))).status_code == 403
            codes = [(await env.http.post("/v1/items", json=body, headers={"Authorization": f"Bearer mpr_guess{i}"}))
                     .status_code for i in range(settings.http.auth_failures_per_minute + 2)]
            assert codes[:settings.http.auth_failures_per_minute] == [401] * settings.http.auth_failures_per_minute
            assert codes[-1] == 429
            # Past the budget a valid token is refused too (guessing on learns nothing).
            refused = await env.http.post("/v1/items", json=body, headers=env.auth("shop"))
            assert refused.status_code == 429 and "retry-after" in refused.headers

    asyncio.run(scenario())


def test_an_edit_is_409_without_the_flag_and_a_new_revision_with_it(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            first = await env.http.post("/v1/moderate", headers=env.auth("shop"),
                                        json={"content_id": "post-1", "text": "good morning everyone"})
            assert first.status_code == 200 and first.json()["decision"] == "allow"
            assert first.json()["revision"] == 1
            edit = {"content_id": "post-1", "text": "i will hurt you"}
            refused = await env.http.post("/v1/items", headers=env.auth("shop"), json=edit)
            assert refused.status_code == 409
            assert refused.json()["reason"] == "edit_without_flag"
            assert refused.json()["conflicts"] == [{"index": 0, "content_id": "post-1", "reason": "edit_without_flag"}]
            assert "hurt" not in refused.text
            # A batch with one conflicting item is refused whole.
            mixed = await env.http.post("/v1/items", headers=env.auth("shop"),
                                        json={"items": [{"content_id": "post-2", "text": "good morning everyone"},
                                                        edit]})
            assert mixed.status_code == 409 and mixed.json()["conflicts"][0]["index"] == 1
            assert (await env.http.get("/v1/items/post-2", headers=env.auth("shop"))).status_code == 404
            # With the flag: a new revision, moderated again, superseding the first verdict.
            edited = await env.http.post("/v1/moderate", headers=env.auth("shop"), json={**edit, "edit": True})
            assert edited.status_code == 200, edited.text
            body = edited.json()
            assert (body["decision"], body["revision"], body["final"]) == ("block", 2, True)
            assert body["verdict"]["supersedes"] == first.json()["verdict"]["verdict_id"]
            state = await env.http.get("/v1/items/post-1", headers=env.auth("shop"))
            assert (state.json()["state"], state.json()["revision"]) == ("removed", 2)
            # The same edit again is a duplicate; another platform cannot touch the id at all.
            again = await env.http.post("/v1/items", headers=env.auth("shop"), json={**edit, "edit": True})
            assert again.json()["status"] == "duplicate"
            taken = await env.http.post("/v1/items", headers=env.auth("forum"),
                                        json={"content_id": "post-1", "text": "good morning everyone", "edit": True})
            assert taken.status_code == 409 and taken.json()["reason"] == "id_taken"
            assert (await env.http.get("/v1/items/post-1", headers=env.auth("forum"))).status_code == 404

    asyncio.run(scenario())


def test_moderate_waits_for_the_final_verdict_and_never_past_the_deadline(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings) as env:
            blocked = await env.http.post("/v1/moderate", headers=env.auth("shop"),
                                          json={"content_id": "m-1", "text": "i will hurt you"})
            body = blocked.json()
            assert (body["decision"], body["state"], body["final"], body["timed_out"]) == ("block", "removed", True,
                                                                                           False)
            assert Verdict.model_validate(body["verdict"]).platform == "shop"
            # Escalated: hidden pending with the provisional verdict, answered at the deadline.
            pending = await env.http.post("/v1/moderate?deadline_ms=600", headers=env.auth("shop"),
                                          json={"content_id": "m-2", "text": "is this a threat?"})
            body = pending.json()
            assert (body["decision"], body["state"], body["final"], body["timed_out"]) == (
                "hidden_pending", "hidden_pending", False, True)
            assert body["verdict"]["status"] == "provisional"
            assert 600 <= body["waited_ms"] < 600 + 2000
            # A deadline of 0 answers at once, whatever is known.
            now = await env.http.post("/v1/moderate?deadline_ms=0", headers=env.auth("shop"),
                                      json={"content_id": "m-3", "text": "see you at the market"})
            assert now.json()["timed_out"] is True and now.json()["decision"] == "hidden_pending"
            # Asked again once decided: answered from the store without waiting.
            await wait_state(env, "shop", "m-3", "visible")
            again = await env.http.post("/v1/moderate", headers=env.auth("shop"),
                                        json={"content_id": "m-3", "text": "see you at the market"})
            assert again.json()["decision"] == "allow" and again.json()["timed_out"] is False

    asyncio.run(scenario())


def test_triage_lag_past_the_bound_is_429_with_retry_after(settings: Settings) -> None:
    async def scenario() -> None:
        async with running(settings, pump=False) as env:  # nobody consumes: the lag only grows
            for i in range(4):
                answer = await env.http.post("/v1/items", headers=env.auth("shop"),
                                             json={"content_id": f"lag-{i}", "text": "good morning everyone"})
                assert answer.status_code == 202
            await asyncio.sleep(0.1)  # past lag_refresh_s
            refused = await env.http.post("/v1/items", headers=env.auth("shop"),
                                          json={"content_id": "lag-9", "text": "good morning everyone"})
            assert refused.status_code == 429, refused.text
            assert refused.headers["retry-after"] == str(settings.gateway.retry_after_s)
            assert refused.json()["triage_lag"] == 4
            # Nothing was kept of the refused item: it is new when sent again, and duplicates are still answered.
            assert (await env.http.get("/v1/items/lag-9", headers=env.auth("shop"))).status_code == 404
            dup = await env.http.post("/v1/items", headers=env.auth("shop"),
                                      json={"content_id": "lag-0", "text": "good morning everyone"})
            assert dup.status_code == 202 and dup.json()["status"] == "duplicate"
            # Triage catches up: accepted again.
            pump = TriagePump(settings, SCRIPT)
            await pump.start()
            try:
                await pump.wait_assigned()
                for _ in range(200):
                    ok = await env.http.post("/v1/items", headers=env.auth("shop"),
                                             json={"content_id": "lag-9", "text": "good morning everyone"})
                    if ok.status_code == 202:
                        break
                    await asyncio.sleep(0.1)
                assert ok.status_code == 202, ok.text
            finally:
                await pump.stop()

    asyncio.run(scenario())


def test_broker_down_is_503_and_nothing_is_kept(settings: Settings) -> None:
    class DownSink:
        async def send_many(self, messages: list) -> None:
            from pipeline.errors import BrokerUnavailable

            raise BrokerUnavailable("broker did not acknowledge: test")

    async def scenario() -> None:
        await ensure_topics(settings.kafka)
        gateway = Gateway(settings, sink=DownSink())
        await gateway.start()
        token = await TokenStore(gateway.store).create("shop", Role.PLATFORM)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(settings, gateway)),
                                         base_url="http://gateway") as http:
                answer = await http.post("/v1/items", headers={"Authorization": f"Bearer {token}"},
                                         json={"content_id": "d-1", "text": "good morning everyone"})
                assert answer.status_code == 503 and "retry-after" in answer.headers
                # Rolled back: another text for the id is not an edit of something that never got through.
                assert (await gateway.intake.record("d-1")).platform is None
        finally:
            await gateway.stop()

    asyncio.run(scenario())


def test_items_published_over_kafka_keep_their_platform(settings: Settings) -> None:
    """An id a producer published straight to Kafka is that platform's: the gateway neither hands it to another
    platform nor lets its owner edit it without the flag."""
    async def scenario() -> None:
        async with running(settings) as env:
            topic = settings.kafka.topic(settings.kafka.incoming_topic)
            item = ContentItem(content_id="k-1", text="good morning everyone", platform="shop")
            await env.gateway.publisher.send_many([(topic, "k-1", item.to_bytes())])  # type: ignore[union-attr]
            await wait_state(env, "shop", "k-1", "visible")
            assert (await env.http.post("/v1/items", headers=env.auth("forum"),
                                        json={"content_id": "k-1", "text": "good morning everyone"})).status_code == 409
            dup = await env.http.post("/v1/items", headers=env.auth("shop"),
                                      json={"content_id": "k-1", "text": "good morning everyone"})
            assert dup.json()["status"] == "duplicate"

    asyncio.run(scenario())
