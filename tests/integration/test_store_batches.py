"""The ledger's batch calls (one round trip per step of a batch) do exactly what the single calls do, in order, on
both implementations: the Redis store on a real (private) Redis, and the in-memory one."""

import asyncio

import pytest

from pipeline.config import RedisSettings
from pipeline.errors import StoreUnavailable
from pipeline.schemas import Decision, Stage, Verdict, VerdictStatus
from pipeline.store import EffectKind, InMemoryStore, RedisStore, Visibility, item_effect

pytestmark = pytest.mark.integration


def verdict(cid: str, status: VerdictStatus, decision: Decision, verdict_id: str, revision: int = 1) -> Verdict:
    return Verdict(verdict_id=verdict_id, content_id=cid, status=status, decision=decision, stage=Stage.TRIAGE,
                   revision=revision)


def make_store(kind: str, stack, prefix: str):  # type: ignore[no-untyped-def]
    return RedisStore(RedisSettings(url=stack.redis_url, key_prefix=prefix)) if kind == "redis" else InMemoryStore()


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_record_many_is_record_in_order(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        hide = verdict("b1", VerdictStatus.PROVISIONAL, Decision.HIDE_PENDING, "v-hide")
        allow = verdict("b2", VerdictStatus.FINAL, Decision.ALLOW, "v-allow")
        late = verdict("b2", VerdictStatus.FINAL, Decision.BLOCK, "v-late")
        first = await store.record(EffectKind.FINAL, item_effect("b3", 1), b"earlier")
        results = await store.record_many([
            (EffectKind.PROVISIONAL, item_effect("b1", 1), hide.to_bytes(), hide),
            (EffectKind.FINAL, item_effect("b2", 1), allow.to_bytes(), allow),
            (EffectKind.FINAL, item_effect("b2", 1), late.to_bytes(), late),  # same slot, later: the first wins
            (EffectKind.FINAL, item_effect("b3", 1), b"again", None),  # recorded before the batch
            (EffectKind.ESCALATION, item_effect("b1", 1), b"escalation", None),
        ])
        assert first.created
        assert [r.created for r in results] == [True, True, False, False, True]
        assert results[2].payload == allow.to_bytes() and results[3].payload == b"earlier"
        assert not any(r.published for r in results)
        assert (await store.visibility("b1")).state is Visibility.HIDDEN_PENDING
        shown = await store.visibility("b2")
        assert shown.state is Visibility.VISIBLE and shown.verdict.verdict_id == "v-allow"  # type: ignore[union-attr]
        assert await store.record_many([]) == []
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_recorded_many_and_mark_published_many(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        await store.record(EffectKind.FINAL, item_effect("m1", 1), b"one")
        await store.record(EffectKind.ESCALATION, item_effect("m2", 1), b"two")
        keys = [(EffectKind.FINAL, item_effect("m1", 1)), (EffectKind.ESCALATION, item_effect("m1", 1)),
                (EffectKind.ESCALATION, item_effect("m2", 1))]
        before = await store.recorded_many(keys)
        assert [None if r is None else (r.payload, r.published) for r in before] == \
            [(b"one", False), None, (b"two", False)]
        await store.mark_published_many([keys[0], keys[2], (EffectKind.FINAL, item_effect("absent", 1))])
        after = await store.recorded_many(keys)
        assert [None if r is None else r.published for r in after] == [True, None, True]
        assert await store.recorded(EffectKind.FINAL, item_effect("absent", 1)) is None  # marking creates nothing
        await store.mark_published_many([])
        assert await store.recorded_many([]) == []
        await store.close()

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", ["redis", "memory"])
def test_revisions_is_revision_in_order(kafka_stack, unique_prefix, kind: str) -> None:
    async def scenario() -> None:
        store = make_store(kind, kafka_stack, unique_prefix)
        got = await store.revisions([
            ("r1", "hash-a", "t|0|1|d1"),
            ("r1", "hash-a", "t|0|2|d2"),  # the same text again: the same revision
            ("r1", "hash-b", "t|0|3|d3"),  # an edit
            ("r2", "hash-c", "t|0|4|d4"),
            ("r1", "hash-a", "t|0|1|d1"),  # the first message replayed
        ])
        assert [(r.number, r.new, r.latest) for r in got] == [(1, True, 1), (1, False, 1), (2, True, 2),
                                                              (1, True, 1), (1, False, 2)]
        assert await store.revisions([]) == []
        await store.close()

    asyncio.run(scenario())


def test_in_memory_batch_calls_fail_as_a_whole_when_unavailable() -> None:
    async def scenario() -> None:
        store = InMemoryStore()
        store.available = False
        for call in (store.record_many([(EffectKind.FINAL, item_effect("x", 1), b"p", None)]),
                     store.recorded_many([(EffectKind.FINAL, item_effect("x", 1))]),
                     store.mark_published_many([(EffectKind.FINAL, item_effect("x", 1))]),
                     store.revisions([("x", "h", "t|0|1|d")])):
            with pytest.raises(StoreUnavailable):
                await call
        store.available = True
        assert await store.recorded(EffectKind.FINAL, item_effect("x", 1)) is None  # nothing was half applied

    asyncio.run(scenario())


def test_redis_batch_calls_raise_store_unavailable_when_redis_is_down() -> None:
    from pipeline.stack import free_port

    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=f"redis://127.0.0.1:{free_port()}/0"))
        with pytest.raises(StoreUnavailable):
            await store.record_many([(EffectKind.FINAL, item_effect("x", 1), b"p", None)])
        with pytest.raises(StoreUnavailable):
            await store.recorded_many([(EffectKind.FINAL, item_effect("x", 1))])
        await store.close()

    asyncio.run(scenario())


def test_batch_calls_reload_scripts_the_server_forgot(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        await store.revisions([("s1", "hash-a", "t|0|1|d1")])
        await store.redis.script_flush()  # what a Redis restart does to the script cache
        got = await store.revisions([("s1", "hash-a", "t|0|2|d2"), ("s2", "hash-b", "t|0|3|d3")])
        assert [(r.number, r.new) for r in got] == [(1, False), (1, True)]
        await store.redis.script_flush()
        recorded = await store.record_many([(EffectKind.FINAL, item_effect("s1", 1), b"p", None),
                                            (EffectKind.FINAL, item_effect("s1", 1), b"q", None)])
        assert [(r.created, r.payload) for r in recorded] == [(True, b"p"), (False, b"p")]
        await store.close()

    asyncio.run(scenario())


def test_redis_attempts_count_each_record_in_one_call(kafka_stack, unique_prefix) -> None:
    from pipeline.codec import Record
    from pipeline.store.attempts import ATTEMPTS_TTL_S, RedisAttempts
    from pipeline.store.keys import Namespace

    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        attempts = RedisAttempts(store)
        records = [Record("t", 0, offset, None, f"v{offset}".encode(), None) for offset in (1, 2, 3)]
        assert await attempts.begin(records, solo=False) == [1, 1, 1]
        assert await attempts.begin(records[:2], solo=False) == [2, 2]
        assert await attempts.begin(records[1:2], solo=True) == [1]
        key = store.key(Namespace.ATTEMPTS, *records[1].message_id.split("|"))
        assert await store.redis.hgetall(key) == {b"batch": b"2", b"solo": b"1"}
        assert 0 < await store.redis.ttl(key) <= ATTEMPTS_TTL_S
        assert await attempts.begin([], solo=False) == []
        await attempts.done(records)
        assert await attempts.begin(records[:1], solo=False) == [1]
        await store.close()

    asyncio.run(scenario())
