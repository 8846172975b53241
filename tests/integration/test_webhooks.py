"""Webhook delivery against a real local HTTP receiver that fails, times out and recovers.

The deliverer consumes a real ``moderation.verdicts`` topic (private prefix) and keeps its dead letters in a real
Redis; the receiver is :class:`pipeline.webhooks.testing.ScriptedReceiver`, a real HTTP server on a loopback port.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta, timezone

import pytest

from pipeline.broker import Publisher, ensure_topics
from pipeline.config import KafkaSettings, RedisSettings, Settings, WebhookSettings
from pipeline.schemas import Decision, Stage, Verdict, WebhookEvent
from pipeline.store.redis import RedisStore
from pipeline.webhooks.deliverer import Deliverer, replay
from pipeline.webhooks.registry import WebhookRegistry, delivery_id
from pipeline.webhooks.sender import Sender
from pipeline.webhooks.signing import ATTEMPT_HEADER, DELIVERY_HEADER, EVENT_HEADER
from pipeline.webhooks.testing import Drop, Hang, Respond, ScriptedReceiver

pytestmark = pytest.mark.integration

KEY = "signing-key-for-webhook-tests"


@pytest.fixture
def settings(kafka_stack, unique_prefix, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=2,
                            session_timeout_s=2.0, heartbeat_interval_s=0.5, commit_interval_s=0.1),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
        webhooks=WebhookSettings(signing_key=KEY, timeout_s=0.5, max_attempts=4, backoff_initial_s=0.05,
                                 backoff_max_s=0.2, suspend_after=2, probe_interval_s=0.5),
    )


def verdict(cid: str, decision: Decision, platform: str = "shop", supersedes: str | None = None,
            revision: int = 1, **extra: object) -> Verdict:
    return Verdict.final(cid, decision, Stage.TRIAGE, platform=platform, supersedes=supersedes, revision=revision,
                         **extra)


@asynccontextmanager
async def delivering(settings: Settings, receiver: ScriptedReceiver, *,
                     register: bool = True) -> AsyncIterator[tuple[Deliverer, Publisher, WebhookRegistry]]:
    await ensure_topics(settings.kafka)
    store = RedisStore(settings.redis)
    registry = WebhookRegistry(store, settings.redis.verdict_ttl_s)
    url = await receiver.start()
    if register:
        hook = await registry.add("shop", url, now=time.time() - 60)
        receiver.secret = hook.secret(KEY)
    publisher = Publisher(settings.kafka)
    await publisher.start()
    deliverer = Deliverer(settings)
    task = asyncio.create_task(deliverer.run())
    try:
        await asyncio.wait_for(deliverer.assigned.wait(), 30)
        yield deliverer, publisher, registry
    finally:
        deliverer.stop()
        await asyncio.wait_for(task, 30)
        await publisher.stop()
        await receiver.stop()
        await store.close()


async def publish(settings: Settings, publisher: Publisher, *verdicts: Verdict) -> None:
    topic = settings.kafka.topic(settings.kafka.verdicts_topic)
    for v in verdicts:
        await publisher.send(topic, v.content_id, v.to_bytes())


async def until(check, timeout_s: float = 20.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not ((await found) if inspect.isawaitable(found := check()) else found):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def dead_count(registry: WebhookRegistry, n: int) -> bool:
    return (await registry.counts("shop"))["dead_letters"] == n


def test_a_receiver_that_fails_times_out_and_recovers_gets_every_verdict_once_signed_and_in_order(
    settings: Settings,
) -> None:
    # 500, then no answer within the timeout, then a dropped connection, then healthy.
    receiver = ScriptedReceiver(script=[Respond(500), Hang(2.0), Drop()])

    async def scenario() -> None:
        async with delivering(settings, receiver) as (deliverer, publisher, registry):
            first = verdict("post-1", Decision.ALLOW)
            edited = verdict("post-1", Decision.BLOCK, supersedes=first.verdict_id, revision=2)
            other = verdict("post-2", Decision.ALLOW)
            await publish(settings, publisher, first, edited, other)
            await until(lambda: len(receiver.accepted()) == 3, what="three deliveries")
            got = receiver.accepted()
            ids = [d.delivery_id for d in got]
            assert sorted(ids) == sorted(delivery_id("shop", v.verdict_id) for v in (first, edited, other))
            # In order per content id: the edit's verdict after the first one.
            post1 = [d for d in got if d.content_id == "post-1"]
            assert [d.verdict.verdict_id for d in post1] == [first.verdict_id, edited.verdict_id]
            assert [d.event for d in post1] == [WebhookEvent.FINAL, WebhookEvent.SUPERSEDING]
            assert post1[1].supersedes == first.verdict_id and post1[1].revision == 2
            # Every request signed; the retried one kept its delivery id and counted its attempts.
            assert all(r.signature_ok for r in receiver.received)
            assert len(receiver.received) == 6  # three failures, three successes
            for did in ids:
                tries = [r for r in receiver.received if r.headers[DELIVERY_HEADER.lower()] == did]
                assert [r.headers[ATTEMPT_HEADER.lower()] for r in tries] == [str(n) for n in range(1, len(tries) + 1)]
                assert len({r.headers[EVENT_HEADER.lower()] for r in tries}) == 1
                assert tries[-1].accepted and not any(r.accepted for r in tries[:-1])
            assert await registry.counts("shop") == {"dead_letters": 0, "parked_ids": 0}
            await until(lambda: deliverer.pending == 0, what="nothing pending")

    asyncio.run(scenario())


def test_dead_letters_park_their_content_id_and_replay_sends_them_in_order(settings: Settings) -> None:
    receiver = ScriptedReceiver(default=Respond(503))

    async def scenario() -> None:
        async with delivering(settings, receiver) as (deliverer, publisher, registry):
            a1 = verdict("a", Decision.ALLOW)
            await publish(settings, publisher, a1)
            await until(lambda: deliverer.health["shop"].dead_in_a_row == 1, what="a1 dead-lettered")
            # Behind a1's dead letter: a2 is parked, never sent before a1.
            a2 = verdict("a", Decision.BLOCK, supersedes=a1.verdict_id, revision=2)
            b1 = verdict("b", Decision.ALLOW)
            await publish(settings, publisher, a2, b1)
            await until(lambda: deliverer.health["shop"].suspended_until is not None, what="shop suspended")
            sent_a = [r for r in receiver.received if r.delivery and r.delivery.content_id == "a"]
            assert {r.delivery.verdict.verdict_id for r in sent_a} == {a1.verdict_id}
            # Suspended: a new item's delivery is parked without an attempt.
            c1 = verdict("c", Decision.ALLOW)
            tried = len(receiver.received)
            await publish(settings, publisher, c1)
            await until(lambda: dead_count(registry, 4), what="c1 parked")
            assert len(receiver.received) == tried
            letters = await registry.dead_letters("shop")
            assert [(x.delivery.content_id, x.reason) for x in letters] == [
                ("a", "attempts"), ("a", "parked"), ("b", "attempts"), ("c", "suspended")]
            assert letters[0].attempts == settings.webhooks.max_attempts and "HTTP 503" in letters[0].error
            assert await registry.counts("shop") == {"dead_letters": 4, "parked_ids": 3}

            # The endpoint recovers. A probe gets through and resumes the platform; replay sends the rest in order.
            receiver.default = Respond(200)
            d1 = verdict("d", Decision.ALLOW, decided_at=datetime.now(timezone.utc))
            await asyncio.sleep(settings.webhooks.probe_interval_s)
            await publish(settings, publisher, d1)
            await until(lambda: any(x.content_id == "d" for x in receiver.accepted()), what="the probe")
            # The receiver records the probe before its answer reaches the deliverer: wait for the deliverer too.
            await until(lambda: deliverer.health["shop"].suspended_until is None, what="the platform resumed")
            sender = Sender(settings.webhooks)
            try:
                outcome = await replay(registry, sender, KEY, "shop")
            finally:
                await sender.close()
            assert outcome == {"platform": "shop", "delivered": 4, "remaining": 0, "error": None}
            order = [(x.content_id, x.verdict.verdict_id) for x in receiver.accepted()]
            assert order[-4:] == [("a", a1.verdict_id), ("a", a2.verdict_id), ("b", b1.verdict_id),
                                  ("c", c1.verdict_id)]
            assert await registry.counts("shop") == {"dead_letters": 0, "parked_ids": 0}
            # Unparked: the next verdict for `a` goes straight out.
            a3 = verdict("a", Decision.ALLOW, supersedes=a2.verdict_id, revision=3)
            await publish(settings, publisher, a3)
            await until(lambda: receiver.accepted()[-1].verdict.verdict_id == a3.verdict_id, what="a3")

    asyncio.run(scenario())


def test_replay_stops_at_the_first_failure_to_keep_order(settings: Settings) -> None:
    receiver = ScriptedReceiver(default=Respond(500))

    async def scenario() -> None:
        async with delivering(settings, receiver) as (deliverer, publisher, registry):
            await publish(settings, publisher, verdict("x", Decision.ALLOW), verdict("y", Decision.ALLOW))
            await until(lambda: dead_count(registry, 2), what="both dead-lettered")
            receiver.script = [Respond(200), Respond(500)]
            sender = Sender(settings.webhooks)
            try:
                outcome = await replay(registry, sender, KEY, "shop")
            finally:
                await sender.close()
            assert (outcome["delivered"], outcome["remaining"]) == (1, 1) and "HTTP 500" in outcome["error"]

    asyncio.run(scenario())


def test_only_final_verdicts_of_registered_platforms_decided_after_registration(settings: Settings) -> None:
    receiver = ScriptedReceiver()

    async def scenario() -> None:
        async with delivering(settings, receiver) as (deliverer, publisher, registry):
            old = verdict("old", Decision.ALLOW, decided_at=datetime.now(timezone.utc) - timedelta(hours=1))
            provisional = Verdict.provisional("p", Stage.TRIAGE, platform="shop")
            foreign = verdict("f", Decision.BLOCK, platform="forum")
            nobody = verdict("n", Decision.BLOCK, platform=None)  # type: ignore[arg-type]
            marker = verdict("m", Decision.ALLOW)
            topic = settings.kafka.topic(settings.kafka.verdicts_topic)
            await publisher.send(topic, "junk", b"{not a verdict")
            await publish(settings, publisher, old, provisional, foreign, nobody, marker)
            await until(lambda: len(receiver.accepted()) >= 1, what="the marker")
            await until(lambda: deliverer.pending == 0, what="nothing pending")
            assert [d.content_id for d in receiver.accepted()] == ["m"]

    asyncio.run(scenario())


def test_a_restarted_deliverer_delivers_what_the_stopped_one_had_not(settings: Settings) -> None:
    """At least once: offsets are committed only up to what was delivered, so a stop mid-retry loses nothing."""
    receiver = ScriptedReceiver(default=Hang(5.0))

    async def scenario() -> None:
        async with delivering(settings, receiver) as (deliverer, publisher, registry):
            pending = [verdict(f"r{i}", Decision.ALLOW) for i in range(3)]
            await publish(settings, publisher, *pending)
            await until(lambda: len(receiver.received) >= 3, what="first attempts")
        assert receiver.accepted() == []
        healthy = ScriptedReceiver()
        url = await healthy.start()
        store = RedisStore(settings.redis)
        hook = await WebhookRegistry(store, settings.redis.verdict_ttl_s).add("shop", url, now=time.time() - 60)
        healthy.secret = hook.secret(KEY)
        again = Deliverer(settings)
        task = asyncio.create_task(again.run())
        try:
            await until(lambda: len(healthy.accepted()) == 3, timeout_s=30, what="redelivery")
            assert sorted(d.delivery_id for d in healthy.accepted()) == sorted(
                delivery_id("shop", v.verdict_id) for v in pending)
            assert all(r.signature_ok for r in healthy.received)
        finally:
            again.stop()
            await asyncio.wait_for(task, 30)
            await healthy.stop()
            await store.close()

    asyncio.run(scenario())
