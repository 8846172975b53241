"""Watching a run from the broker's side: consumer lag per role over time, and which items were dropped.

Shared by the stress gate (:mod:`pipeline.harness.bench.stress`) and the capacity bench
(:mod:`pipeline.harness.bench.capacity`). The lag is read the way an operator reads it (the committed offsets of
each role's consumer group against the end of its input topic), with one admin client and one consumer kept open
for the whole run, so that sampling every second or two costs the machine under test little.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from types import TracebackType

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from pipeline.app import Role, group_id, role_topic
from pipeline.config import Settings
from pipeline.harness.journey import JourneyObserver

logger = logging.getLogger(__name__)


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (``uptime``'s numbers), printed next to every published number: on a
    shared machine a latency means little without them."""
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


class LagSampler:
    """Every ``interval_s``, the lag of each role's consumer group on its input topic: ``samples`` is a list of
    ``{"t": seconds since start, "lag": {role: messages or None}}`` (None: the broker did not answer in time)."""

    def __init__(self, settings: Settings, roles: Sequence[Role], interval_s: float = 2.0) -> None:
        self.settings = settings
        self.roles = list(roles)
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._admin: AIOKafkaAdminClient | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._t0 = time.monotonic()

    async def __aenter__(self) -> LagSampler:
        servers = self.settings.kafka.bootstrap_servers
        self._admin = AIOKafkaAdminClient(bootstrap_servers=servers, request_timeout_ms=5000)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=servers, group_id=None, enable_auto_commit=False,
                                          request_timeout_ms=5000)
        await self._admin.start()
        await self._consumer.start()
        await self._consumer.topics()
        self._t0 = time.monotonic()
        self._task = asyncio.create_task(self._run(), name="lag-sampler")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await asyncio.gather(*(c.close() if isinstance(c, AIOKafkaAdminClient) else c.stop()
                               for c in (self._admin, self._consumer) if c is not None), return_exceptions=True)

    async def _run(self) -> None:
        while True:
            started = time.monotonic()
            lags = {}
            for role in self.roles:
                try:
                    lags[role.value] = await asyncio.wait_for(self.lag(role), 5.0)
                except (KafkaError, asyncio.TimeoutError, OSError) as exc:
                    logger.debug("lag of %s not read: %s", role.value, exc)
                    lags[role.value] = None
            self.samples.append({"t": round(started - self._t0, 1), "lag": lags})
            await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))

    async def lag(self, role: Role) -> int:
        """Messages on ``role``'s input topic that its consumer group has not committed yet."""
        assert self._admin is not None and self._consumer is not None
        topic = role_topic(self.settings, role)
        partitions = self._consumer.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if not tps:
            return 0
        committed = await self._admin.list_consumer_group_offsets(group_id(self.settings, role), partitions=tps)
        ends = await self._consumer.end_offsets(tps)
        starts = await self._consumer.beginning_offsets(tps)
        total = 0
        for tp in tps:
            meta = committed.get(tp)
            position = meta.offset if meta is not None and meta.offset >= 0 else starts[tp]
            total += max(0, ends[tp] - position)
        return total

    def max_lag(self) -> dict[str, int | None]:
        out: dict[str, int | None] = {}
        for role in self.roles:
            seen = [s["lag"][role.value] for s in self.samples if s["lag"].get(role.value) is not None]
            out[role.value] = max(seen) if seen else None
        return out


def dropped(observer: JourneyObserver, content_ids: Sequence[str]) -> list[str]:
    """The ids with neither a final verdict, nor a review task, nor a dead letter: what a platform never heard
    back about."""
    lettered = {d.content_id for d in observer.dead_letters.values() if d.content_id}
    return [c for c in content_ids if c not in lettered and not (c in observer.journeys and
                                                                  observer.journeys[c].settled)]
