"""The audit relay: review actions appended to a Redis stream, published to ``moderation.decisions``.

The audit log is an outbox: each reviewer action is appended to the stream in the same atomic step as the state
change (:mod:`pipeline.review.queue`), and this relay publishes new entries at least once (``decision_id`` is the
consumers' idempotency key). One service instance relays at a time, holding a short Redis lease; a cursor in Redis
remembers the last entry published, so a restarted or another instance carries on where it stopped.
"""

from __future__ import annotations

import asyncio
import logging

from pipeline.effects import MessageSink
from pipeline.review.queue import ReviewQueue
from pipeline.store.keys import Namespace
from pipeline.store.redis import RedisStore

logger = logging.getLogger(__name__)

LEASE_MS = 10_000


class AuditRelay:
    def __init__(self, store: RedisStore, queue: ReviewQueue, publisher: MessageSink, topic: str,
                 instance_id: str) -> None:
        self.store = store
        self.queue = queue
        self.publisher = publisher
        self.topic = topic
        self.instance_id = instance_id

    async def relay_once(self, batch: int = 500) -> int:
        """Relay new audit-log entries; returns how many (0 while another instance holds the lease)."""
        redis = self.store.redis
        lock = self.store.key(Namespace.REVIEW_RELAY_LOCK)
        if not await self.store.guard(redis.set(lock, self.instance_id, nx=True, px=LEASE_MS)):
            holder = await self.store.guard(redis.get(lock))
            if holder is None or holder.decode() != self.instance_id:
                return 0
            await self.store.guard(redis.pexpire(lock, LEASE_MS))
        cursor_key = self.store.key(Namespace.REVIEW_RELAY_CURSOR)
        relayed = 0
        while True:
            last = await self.store.guard(redis.get(cursor_key))
            entries = await self.queue.log_after(last.decode() if last else "", batch)
            if not entries:
                return relayed
            await self.publisher.send_many([(self.topic, e.content_id, e.to_bytes()) for _, e in entries])
            await self.store.guard(redis.set(cursor_key, entries[-1][0]))
            relayed += len(entries)

    async def run(self, stopping: asyncio.Event, interval_s: float) -> None:
        """Relay every ``interval_s`` until ``stopping`` is set; outlives a broker or Redis hiccup."""
        while not stopping.is_set():
            try:
                await self.relay_once()
            except Exception:  # noqa: BLE001 - the relay must outlive a broker or Redis hiccup
                logger.warning("review: audit relay failed; retrying", exc_info=True)
                await pause(stopping, 2.0)
            await pause(stopping, interval_s)


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep ``seconds`` or until ``stopping`` is set, whichever comes first."""
    try:
        await asyncio.wait_for(stopping.wait(), seconds)
    except asyncio.TimeoutError:
        pass
