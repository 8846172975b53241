"""The Redis ledger and visibility store against a real (private) Redis."""

import asyncio

import pytest

from pipeline.config import RedisSettings
from pipeline.schemas import Decision, ReviewReason, ReviewTask, ContentItem, Stage, TriageScores, Verdict, VerdictStatus
from pipeline.review.queue import ReviewQueue
from pipeline.store import EffectKind, InMemoryStore, RedisStore, Visibility, item_effect

pytestmark = pytest.mark.integration


def verdict(cid: str, status: VerdictStatus, decision: Decision, verdict_id: str) -> Verdict:
    return Verdict(verdict_id=verdict_id, content_id=cid, status=status, decision=decision, stage=Stage.TRIAGE)


def test_first_final_verdict_wins_and_redelivery_gets_it_back(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        first = verdict("c1", VerdictStatus.FINAL, Decision.ALLOW, "v-first")
        second = verdict("c1", VerdictStatus.FINAL, Decision.BLOCK, "v-second")
        recorded = await store.record(EffectKind.FINAL, item_effect("c1", 1), first.to_bytes(), first)
        assert recorded.created and not recorded.published
        again = await store.record(EffectKind.FINAL, item_effect("c1", 1), second.to_bytes(), second)
        assert not again.created
        assert Verdict.model_validate_json(again.payload).verdict_id == "v-first"
        await store.mark_published(EffectKind.FINAL, item_effect("c1", 1))
        assert (await store.recorded(EffectKind.FINAL, item_effect("c1", 1))).published  # type: ignore[union-attr]
        vis = await store.visibility("c1")
        assert vis.state is Visibility.VISIBLE and vis.final and vis.verdict.verdict_id == "v-first"  # type: ignore[union-attr]
        await store.close()

    asyncio.run(scenario())


def test_concurrent_records_create_exactly_one(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        results = await asyncio.gather(
            *(store.record(EffectKind.FINAL, item_effect("c2", 1), f"payload-{i}".encode()) for i in range(20))
        )
        assert sum(r.created for r in results) == 1
        assert len({r.payload for r in results}) == 1
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def make_store(kind: str, stack, prefix: str):  # type: ignore[no-untyped-def]
    """The Redis store, or the in-memory one that must keep its semantics (the same scenarios run on both)."""
    return RedisStore(RedisSettings(url=stack.redis_url, key_prefix=prefix)) if kind == "redis" else InMemoryStore()


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_provisional_never_rehides_a_decided_item(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        final = verdict("c3", VerdictStatus.FINAL, Decision.BLOCK, "v-final")
        await store.record(EffectKind.FINAL, item_effect("c3", 1), final.to_bytes(), final)
        late = verdict("c3", VerdictStatus.PROVISIONAL, Decision.HIDE_PENDING, "v-prov")
        await store.record(EffectKind.PROVISIONAL, item_effect("c3", 1), late.to_bytes(), late)
        vis = await store.visibility("c3")
        assert vis.state is Visibility.REMOVED and vis.final
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_provisional_hides_until_final(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        assert (await store.visibility("c4")).state is Visibility.UNKNOWN
        prov = verdict("c4", VerdictStatus.PROVISIONAL, Decision.HIDE_PENDING, "v-prov")
        await store.record(EffectKind.PROVISIONAL, item_effect("c4", 1), prov.to_bytes(), prov)
        assert (await store.visibility("c4")).state is Visibility.HIDDEN_PENDING
        final = verdict("c4", VerdictStatus.FINAL, Decision.ALLOW, "v-final")
        await store.record(EffectKind.FINAL, item_effect("c4", 1), final.to_bytes(), final)
        assert (await store.visibility("c4")).state is Visibility.VISIBLE
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_visibility_follows_the_highest_revision(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        allowed = verdict("c5", VerdictStatus.FINAL, Decision.ALLOW, "v1")
        await store.record(EffectKind.FINAL, item_effect("c5", 1), allowed.to_bytes(), allowed)
        edited = verdict("c5", VerdictStatus.PROVISIONAL, Decision.HIDE_PENDING, "v2p").model_copy(update={"revision": 2})
        await store.record(EffectKind.PROVISIONAL, item_effect("c5", 2), edited.to_bytes(), edited)
        assert (await store.visibility("c5")).state is Visibility.HIDDEN_PENDING  # an edit's hide beats the old final
        late = verdict("c5", VerdictStatus.FINAL, Decision.BLOCK, "v1b").model_copy(update={"revision": 1})
        await store.record(EffectKind.FINAL, item_effect("c5", 1) + ("late",), late.to_bytes(), late)
        shown = await store.visibility("c5")
        assert (shown.state, shown.revision) == (Visibility.HIDDEN_PENDING, 2)  # an older revision never moves it
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_revisions_by_message_and_text(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        first = await store.revision("c6", "hash-a", "t|0|1|d1")
        assert (first.number, first.new, first.latest) == (1, True, 1)
        assert (await store.revision("c6", "hash-a", "t|0|2|d2")).number == 1  # a duplicate of the latest text
        edit = await store.revision("c6", "hash-b", "t|0|3|d3")
        assert (edit.number, edit.new) == (2, True)
        replay = await store.revision("c6", "hash-a", "t|0|1|d1")  # the first message, replayed
        assert (replay.number, replay.new, replay.latest) == (1, False, 2)
        assert (await store.revision("c6", "hash-a", "t|0|4|d4")).number == 3  # edited back: a new revision
        await store.close()

    asyncio.run(scenario())


def test_a_bare_string_effect_id_is_refused(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        with pytest.raises(TypeError):
            await store.record(EffectKind.FINAL, "c7", b"x")  # type: ignore[arg-type]
        await store.close()

    asyncio.run(scenario())


def test_review_queue_is_oldest_first_and_deduplicated(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        queue = ReviewQueue(store)
        triage = TriageScores(model_version="m", violation=0.5, latency_ms=1)
        tasks = []
        for i in range(3):
            item = ContentItem(content_id=f"r{i}", text="t")
            tasks.append(ReviewTask(task_id=f"t{i}", item=item, triage=triage, reason=ReviewReason.EDGE_CASE,
                                    policy_ids=["hate"], ingested_at=item.created_at))
        for task in reversed(tasks):
            assert await queue.enqueue(task)
        assert not await queue.enqueue(tasks[0])
        pending = await queue.pending()
        assert [t.item.content_id for t in pending] == ["r0", "r1", "r2"]
        assert await queue.pending_count() == 3
        await store.close()

    asyncio.run(scenario())


def test_redis_down_raises_store_unavailable() -> None:
    from pipeline.errors import StoreUnavailable
    from pipeline.stack import free_port

    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await store.close()

    asyncio.run(scenario())
