"""Kafka plumbing: topic creation, a publisher that waits for the broker's acknowledgement, consumer lag.

The workers publish through their own aiokafka producer (not Faust's buffered ``topic.send``) so that an effect is
marked published in the ledger only after the broker acknowledged it (``acks=all``). A send the broker did not
acknowledge raises :class:`~pipeline.errors.BrokerUnavailable` (the worker pauses and tries again: an outage never
condemns the message), except a message too large for the producer, which is permanent
(:class:`~pipeline.errors.ContentTooLarge`). Each unacknowledged send is counted in
``modpipe_publish_failures_total``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, MessageSizeTooLargeError, RecordTooLargeError, TopicAlreadyExistsError

from pipeline import metrics
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerUnavailable, ContentTooLarge

MAX_REQUEST_BYTES = 4 * 1024 * 1024

logger = logging.getLogger(__name__)


async def ensure_topics(settings: KafkaSettings, timeout_s: float = 30.0) -> list[str]:
    """Create the pipeline's topics with ``settings.partitions`` partitions; returns the ones created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in settings.all_topics if t not in existing]
        if missing:
            try:
                await admin.create_topics(
                    [NewTopic(t, settings.partitions, settings.replication_factor) for t in missing]
                )
            except TopicAlreadyExistsError:
                logger.debug("topics created concurrently by another process: %s", missing)
        return missing
    finally:
        await admin.close()


class Publisher:
    """A started aiokafka producer that waits for the broker's acknowledgement of every send."""

    def __init__(self, settings: KafkaSettings) -> None:
        self._settings = settings
        self._producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            acks="all",
            linger_ms=2,
            request_timeout_ms=int(settings.request_timeout_s * 1000),
            max_request_size=MAX_REQUEST_BYTES,
        )
        self._started = False

    async def start(self) -> None:
        if not self._started:
            await self._producer.start()
            self._started = True

    async def stop(self) -> None:
        if self._started:
            await self._producer.stop()
            self._started = False

    async def send(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        """Send and wait until the broker has the message (see the module docstring for what it raises)."""
        if isinstance(key, str):
            key = key.encode("utf-8")
        try:
            await self._producer.send_and_wait(topic, value=value, key=key)
        except BaseException as exc:
            raise _unacknowledged(exc) from exc

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None:
        """Send a batch concurrently and wait for all acknowledgements."""
        try:
            futures = []
            for topic, key, value in messages:
                if isinstance(key, str):
                    key = key.encode("utf-8")
                futures.append(await self._producer.send(topic, value=value, key=key))
            await asyncio.gather(*futures)
        except BaseException as exc:
            raise _unacknowledged(exc) from exc


def _unacknowledged(exc: BaseException) -> BaseException:
    """The pipeline error for a send the broker did not acknowledge (other exceptions pass through)."""
    if isinstance(exc, (MessageSizeTooLargeError, RecordTooLargeError)):
        metrics.publish_failures_total.labels("too_large").inc()
        return ContentTooLarge(f"message too large for the broker or producer ({type(exc).__name__})")
    if isinstance(exc, (KafkaError, asyncio.TimeoutError, OSError)):
        metrics.publish_failures_total.labels("unavailable").inc()
        return BrokerUnavailable(f"broker did not acknowledge: {type(exc).__name__}: {exc}")
    return exc


# -- consumer lag -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PartitionLag:
    """One partition of a consumer group's input: where the group is and where the log ends."""

    partition: int
    committed: int | None  # None: the group never committed here (it starts from the log start)
    start: int
    end: int

    @property
    def lag(self) -> int:
        """Messages not yet committed. 0 when the committed offset is past the end (see ``beyond_end``)."""
        return max(0, self.end - (self.committed if self.committed is not None else self.start))

    @property
    def beyond_end(self) -> bool:
        """The committed offset lies past the log end the broker reports (a recreated topic, a restored broker,
        or a broker that reports a stale end after a restart: :func:`pipeline.app` checks which)."""
        return self.committed is not None and self.committed > self.end


async def topic_partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of ``topic`` in order, refreshing the consumer's metadata once if it knows none (a topic
    created after the consumer started); empty when the topic does not exist."""
    partitions = consumer.partitions_for_topic(topic) or set()
    if not partitions:
        await consumer.topics()  # refresh: partitions_for_topic reads cached metadata
        partitions = consumer.partitions_for_topic(topic) or set()
    return [TopicPartition(topic, p) for p in sorted(partitions)]


async def group_lag(settings: KafkaSettings, group: str, topic: str, timeout_s: float = 10.0) -> list[PartitionLag]:
    """Per partition of ``topic``: the committed offset of ``group`` and the log's start and end.

    Works from outside the group (``modpipe status``, a gateway deciding whether to answer 429) and names the
    partitions explicitly (some brokers refuse to list a group's offsets without them). Raises BrokerUnavailable.
    """
    timeout_ms = int(timeout_s * 1000)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=timeout_ms)
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None,
                                enable_auto_commit=False, request_timeout_ms=timeout_ms)
    try:
        await asyncio.wait_for(asyncio.gather(admin.start(), consumer.start()), timeout_s)
        tps = await topic_partitions(consumer, topic)
        if not tps:
            return []
        committed = await asyncio.wait_for(admin.list_consumer_group_offsets(group, partitions=tps), timeout_s)
        ends = await asyncio.wait_for(consumer.end_offsets(tps), timeout_s)
        starts = await asyncio.wait_for(consumer.beginning_offsets(tps), timeout_s)
        lags = []
        for tp in tps:
            meta = committed.get(tp)
            offset = meta.offset if meta is not None and meta.offset >= 0 else None
            lags.append(PartitionLag(tp.partition, offset, starts[tp], ends[tp]))
        return lags
    except (KafkaError, asyncio.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"cannot read the lag of {group} on {topic}: {type(exc).__name__}: {exc}") from exc
    finally:
        await asyncio.gather(admin.close(), consumer.stop(), return_exceptions=True)


async def record_at(settings: KafkaSettings, topic: str, partition: int, offset: int, wait_s: float = 2.0) -> bool:
    """True if the log of ``topic[partition]`` holds a record at ``offset``: tells a log that really ends before
    a committed offset from a broker that only reports a stale end."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="none", fetch_max_wait_ms=200)
    tp = TopicPartition(topic, partition)
    try:
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, offset)
        batch = await consumer.getmany(tp, timeout_ms=int(wait_s * 1000), max_records=1)
        return any(message.offset >= offset for message in batch.get(tp, []))
    except KafkaError:  # OffsetOutOfRange on a broker that reports it: nothing there
        return False
    finally:
        await consumer.stop()


async def fetch_records(
    settings: KafkaSettings, topic: str, partition: int, start: int, end: int, wait_s: float = 3.0
) -> list[tuple[int, bytes | None, bytes | None, int | None]]:
    """The records of ``topic[partition]`` at offsets ``start`` .. ``end - 1`` that the log holds now, as
    ``(offset, key, value, timestamp_ms)``: how a worker fills a gap its consumer skipped (see pipeline.app)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="none", fetch_max_wait_ms=200,
                                max_partition_fetch_bytes=16 * 1024 * 1024)
    tp = TopicPartition(topic, partition)
    found: dict[int, tuple[int, bytes | None, bytes | None, int | None]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    try:
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, start)
        while loop.time() < deadline and len(found) < end - start:
            batch = await consumer.getmany(tp, timeout_ms=500)
            for message in batch.get(tp, []):
                if start <= message.offset < end:
                    found[message.offset] = (message.offset, message.key, message.value, message.timestamp)
                if message.offset >= end - 1:
                    deadline = 0.0
    except KafkaError as exc:
        logger.warning("could not fetch %s[%d] %d..%d: %s", topic, partition, start, end - 1, type(exc).__name__)
    finally:
        await consumer.stop()
    return [found[o] for o in sorted(found)]


__all__ = ["KafkaError", "PartitionLag", "Publisher", "ensure_topics", "fetch_records", "group_lag", "record_at"]
