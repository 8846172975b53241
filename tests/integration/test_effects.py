"""Effects (ledger + publisher) against the real broker and Redis: dead letters are published once per message."""

import asyncio

import pytest
from aiokafka import AIOKafkaConsumer

from pipeline.config import KafkaSettings, RedisSettings, Settings
from pipeline.errors import SchemaError
from pipeline.broker import Publisher, ensure_topics
from pipeline.codec import Record
from pipeline.effects import Effects
from pipeline.schemas import DeadLetter
from pipeline.store import RedisStore

pytestmark = pytest.mark.integration


async def _dead_letters(settings: Settings) -> list[DeadLetter]:
    consumer = AIOKafkaConsumer(
        settings.kafka.topic(settings.kafka.deadletter_topic),
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        group_id=None,
    )
    await consumer.start()
    letters: list[DeadLetter] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1500)
            if not batch:
                break
            for messages in batch.values():
                letters.extend(DeadLetter.model_validate_json(m.value) for m in messages)
    finally:
        await consumer.stop()
    return letters


def test_dead_letter_once_per_message_even_when_offsets_are_reused(kafka_stack, unique_prefix) -> None:
    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=1),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
    )

    async def scenario() -> list[DeadLetter]:
        await ensure_topics(settings.kafka)
        store, publisher = RedisStore(settings.redis), Publisher(settings.kafka)
        await publisher.start()
        effects = Effects(settings.kafka, store, publisher)
        first = Record("content.incoming", 0, 7, None, b"{broken", 0)
        redelivered = Record("content.incoming", 0, 7, None, b"{broken", 0)
        # Same topic/partition/offset, other bytes: a recreated topic or a restarted in-memory broker.
        reused_offset = Record("content.incoming", 0, 7, None, b"\xff\xfe", 0)
        for record in (first, redelivered, reused_offset):
            await effects.dead_letter(record, "triage", SchemaError("bad"))
        await publisher.stop()
        await store.close()
        return await _dead_letters(settings)

    letters = asyncio.run(scenario())
    assert sorted(letter.raw_base64 for letter in letters) == sorted(["e2Jyb2tlbg==", "//4="])
    assert all(letter.error == "bad" and letter.offset == 7 for letter in letters)
