"""Kafka plumbing: topic creation and a publisher that waits for the broker's acknowledgement.

The workers publish through their own aiokafka producer (not Faust's buffered ``topic.send``) so that an effect is
marked published in the ledger only after the broker acknowledged it (``acks=all``).
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from pipeline.config import KafkaSettings

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
            max_request_size=4 * 1024 * 1024,
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
        """Send and wait until the broker has the message. Raises ``KafkaError`` on failure."""
        if isinstance(key, str):
            key = key.encode("utf-8")
        await self._producer.send_and_wait(topic, value=value, key=key)

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None:
        """Send a batch concurrently and wait for all acknowledgements."""
        futures = []
        for topic, key, value in messages:
            if isinstance(key, str):
                key = key.encode("utf-8")
            futures.append(await self._producer.send(topic, value=value, key=key))
        await asyncio.gather(*futures)


__all__ = ["KafkaError", "Publisher", "ensure_topics"]
