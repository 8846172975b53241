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


def test_a_huge_poison_value_dead_letters_within_the_brokers_limits(kafka_stack, unique_prefix) -> None:
    import hashlib

    from pipeline.errors import ContentTooLarge

    settings = Settings(
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=1),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
    )
    value = b'{"content_id": "huge", "text": "' + b"x" * (6 * 1024 * 1024) + b'"}'

    async def scenario() -> list[DeadLetter]:
        await ensure_topics(settings.kafka)
        store, publisher = RedisStore(settings.redis), Publisher(settings.kafka)
        await publisher.start()
        effects = Effects(settings.kafka, store, publisher)
        await effects.dead_letter(Record("content.incoming", 0, 1, b"k" * 200_000, value, 0), "triage",
                                  ContentTooLarge("too big"))
        await publisher.stop()
        await store.close()
        return await _dead_letters(settings)

    (letter,) = asyncio.run(scenario())
    assert letter.raw_truncated and letter.raw_length == len(value)
    assert letter.raw_sha256 == hashlib.sha256(value).hexdigest()
    assert letter.key_truncated and letter.key_length == 200_000
    assert len(letter.to_bytes()) < 1024 * 1024  # fits even Apache Kafka's default message.max.bytes


def test_offset_rule_restarts_a_recreated_topic_from_its_start(kafka_stack, unique_prefix) -> None:
    from aiokafka import AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.structs import OffsetAndMetadata

    from pipeline.app import offset_rule
    from pipeline.broker import group_lag

    settings = Settings(kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, partitions=1))
    topic, group = f"{unique_prefix}recreated", f"{unique_prefix}group"
    tp = TopicPartition(topic, 0)

    async def scenario() -> tuple:
        from aiokafka.admin import NewTopic

        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_stack.kafka_bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, 1, 1)])
        producer = AIOKafkaProducer(bootstrap_servers=kafka_stack.kafka_bootstrap)
        await producer.start()
        for i in range(10):
            await producer.send_and_wait(topic, f"old{i}".encode(), partition=0)
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_stack.kafka_bootstrap, group_id=group,
                                    enable_auto_commit=False)
        await consumer.start()
        consumer.assign([tp])
        await consumer.commit({tp: OffsetAndMetadata(10, "")})
        (healthy,) = await group_lag(settings.kafka, group, topic)
        kept = await offset_rule(settings, topic, healthy)
        # The topic is recreated (deleted and created again, as a restarted in-memory broker does) and a worker that
        # kept running commits its old position into the new incarnation: offset 10 now lies past the end.
        await admin.delete_topics([topic])
        await asyncio.sleep(0.5)
        await admin.create_topics([NewTopic(topic, 1, 1)])
        for i in range(3):
            await producer.send_and_wait(topic, f"new{i}".encode(), partition=0)
        await consumer.commit({tp: OffsetAndMetadata(10, "")})
        (recreated,) = await group_lag(settings.kafka, group, topic)
        decision = await offset_rule(settings, topic, recreated)
        await consumer.stop()
        await producer.stop()
        await admin.close()
        return healthy, kept, recreated, decision

    healthy, kept, recreated, decision = asyncio.run(scenario())
    assert (healthy.committed, healthy.end, healthy.lag, kept) == (10, 10, 0, None)
    assert recreated.beyond_end and (recreated.committed, recreated.end) == (10, 3)
    assert decision is not None and decision.reset_to == 0  # from the log start: new0..new2 are all read
