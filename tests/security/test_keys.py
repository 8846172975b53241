"""No caller-chosen string becomes a Redis key unescaped, and no id can reach another key family.

The holes (found by an outside tester): an item with id ``appeal:<victim>:1`` took the ledger slot of another
item's first appeal; an item with id ``tokens``, once routed to review, wrote its task into the review service's
token hash and set a 30-day expiry on it. Every key is now built by :class:`pipeline.store.keys.Keyspace`.
"""

from __future__ import annotations

import asyncio
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import RedisSettings
from pipeline.harness.review import sample_task
from pipeline.review.auth import Role, TokenStore
from pipeline.review.queue import ReviewQueue, queue_name
from pipeline.schemas import CONTENT_ID_PATTERN, Decision, Stage, Verdict
from pipeline.store import EffectKind, RedisStore, appeal_effect, item_effect, message_effect
from pipeline.store.keys import Keyspace, Namespace, decode_part, encode_part

PREFIX = "modpipe:"
INTERNAL = [n.value for n in Namespace] + [k.value for k in EffectKind] + ["item", "appeal", "message", "admin"]
HOSTILE = st.one_of(
    st.sampled_from(INTERNAL + [f"{a}:{b}" for a, b in itertools.product(INTERNAL[:6], ["", "x", "1", "tokens"])]),
    st.text(alphabet=":%/\\.*?[]{} \t\n\x00é日本\U0001f600abc-_~", min_size=1, max_size=128),
    st.from_regex(CONTENT_ID_PATTERN, fullmatch=True),
)


def family_keys(keys: Keyspace, value: str) -> dict[str, str]:
    """One key of every family that a caller-chosen value can reach."""
    return {
        "vis": keys.key(Namespace.VISIBILITY, value),
        "rev": keys.key(Namespace.REVISIONS, value),
        "final": keys.key(Namespace.LEDGER, EffectKind.FINAL.value, *item_effect(value, 1)),
        "review-effect": keys.key(Namespace.LEDGER, EffectKind.REVIEW.value, *item_effect(value, 1)),
        "appeal": keys.key(Namespace.LEDGER, EffectKind.FINAL.value, *appeal_effect(value, 1, 1)),
        "deadletter": keys.key(Namespace.LEDGER, EffectKind.DEAD_LETTER.value, *message_effect(value, 0, 1, "d")),
        "task": keys.key(Namespace.REVIEW_TASK, value),
        "excluded": keys.key(Namespace.REVIEW_EXCLUDED, value),
        "history": keys.key(Namespace.REVIEW_HISTORY, value),
        "session": keys.key(Namespace.REVIEW_SESSION, value),
        "queue": keys.prefix + Namespace.REVIEW_QUEUE.value + ":" + queue_name("high", value),
    }


FIXED = {Keyspace(PREFIX).key(n) for n in Namespace}


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(HOSTILE, HOSTILE)
def test_no_two_ids_share_a_key_and_no_id_reaches_a_fixed_key(a: str, b: str) -> None:
    keys = Keyspace(PREFIX)
    ka, kb = family_keys(keys, a), family_keys(keys, b)
    assert len(set(ka.values())) == len(ka)  # families never collide for one id
    assert not set(ka.values()) & FIXED  # e.g. id "tokens" never names the token hash
    if a != b:
        assert not set(ka.values()) & set(kb.values())
    for family, key in ka.items():
        assert key.startswith(PREFIX)
        assert ":" not in encode_part(a) and decode_part(encode_part(a)) == a, family


@pytest.mark.unit
def test_namespaces_are_prefix_free() -> None:
    names = [n.value for n in Namespace]
    for a, b in itertools.permutations(names, 2):
        assert not b.startswith(a + ":"), (a, b)


@pytest.mark.unit
def test_safe_ids_encode_to_themselves() -> None:
    assert encode_part("post-1_A.b~") == "post-1_A.b~"
    assert encode_part("appeal:victim:1") == "appeal%3Avictim%3A1"


@pytest.mark.integration
def test_item_named_tokens_never_touches_the_token_hash(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        tokens = TokenStore(store)
        token = await tokens.create("alice", Role.REVIEWER)
        task = sample_task("tokens")
        await store.record(EffectKind.REVIEW, item_effect("tokens", 1), task.to_bytes())
        assert await ReviewQueue(store).enqueue(task)
        await ReviewQueue(store).mark_done("tokens", 30 * 24 * 3600)
        assert (await tokens.authenticate(token)).principal_id == "alice"
        assert [row["id"] for row in await tokens.list()] == ["alice"]
        assert await store.redis.ttl(store.key(Namespace.REVIEW_TOKENS)) == -1  # no expiry was set on it
        await store.close()

    asyncio.run(scenario())


@pytest.mark.integration
def test_item_named_like_an_appeal_slot_cannot_take_it(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        hostile = Verdict.final("appeal:victim:1", Decision.ALLOW, Stage.TRIAGE)
        created = await store.record(EffectKind.FINAL, item_effect(hostile.content_id, 1), hostile.to_bytes(), hostile)
        appeal = Verdict.final("victim", Decision.BLOCK, Stage.REVIEW)
        slot = appeal_effect("victim", 1, 1)
        assert created.created and (await store.record(EffectKind.FINAL, slot, appeal.to_bytes())).created
        assert (await store.recorded(EffectKind.FINAL, slot)).payload == appeal.to_bytes()
        assert (await store.visibility("victim")).verdict is None  # the hostile item's verdict went to its own id
        await store.close()

    asyncio.run(scenario())


@pytest.mark.integration
def test_hostile_content_ids_round_trip_through_the_review_queue(kafka_stack, unique_prefix) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        queue = ReviewQueue(store, {"hate": "high"})
        ids = ["tokens", "queues", "review:tokens", "a:b:c", "x:3Ay", "q:high:hate", "appeal:victim:1"]
        for cid in ids:
            assert await queue.enqueue(sample_task(cid))
        claimed = []
        while (claim := await queue.claim("rev-1", 60)) is not None:
            claimed.append(claim.content_id)
        assert sorted(claimed) == sorted(ids)
        counts, claimed_now = await queue.counts()
        assert [c.queue for c in counts] == [queue_name("high", "hate")] and claimed_now == len(ids)
        await store.close()

    asyncio.run(scenario())
