"""How far behind triage is, read cheaply and often enough that a burst through the gateway cannot bury it.

The signal is the one the fault-tolerance work exposes (docs/OPERATIONS.md): every triage worker measures its
consumer group's lag on ``content.incoming`` each ``worker.monitor_interval_s`` and writes it to Redis
(:func:`pipeline.store.attempts.read_lag`, key ``lag:triage``, expiring after three intervals). When no worker has
reported (none running, or all stuck) the gateway reads the lag from the broker itself
(:func:`pipeline.broker.group_lag`: committed offsets of ``<topic_prefix>modpipe-triage`` against the log end),
which also counts everything waiting while nobody consumes. Each replica reads at most once per
``gateway.lag_refresh_s``; concurrent requests share one read.

A lag that cannot be read at all (Redis and the broker both unreachable) is *unknown*, not over the bound: the
publish that follows finds out whether the broker is there (503 if not).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from pipeline import metrics
from pipeline.broker import PartitionLag, group_lag
from pipeline.config import Settings
from pipeline.errors import RetryableError
from pipeline.store.attempts import read_lag
from pipeline.store.redis import RedisStore

logger = logging.getLogger(__name__)

TRIAGE_ROLE = "triage"


def triage_group(settings: Settings) -> str:
    """The triage role's consumer group (``pipeline.app.group_id`` for the triage role; faust is not imported)."""
    return f"{settings.kafka.topic_prefix}modpipe-{TRIAGE_ROLE}"


@dataclass(frozen=True)
class LagReading:
    lag: int | None  # None: unknown
    source: str  # workers (their Redis lag record), broker (committed offsets vs log end) or unknown
    read_at: float  # monotonic


BrokerLag = Callable[..., Awaitable[list[PartitionLag]]]
LagRecord = Callable[[RedisStore, str], Awaitable[dict[str, Any] | None]]


class TriageLag:
    """The triage lag, cached for ``gateway.lag_refresh_s``; :meth:`over_bound` is what the gateway asks."""

    def __init__(self, settings: Settings, store: RedisStore, *, clock: Callable[[], float] = time.monotonic,
                 broker_lag: BrokerLag = group_lag, lag_record: LagRecord = read_lag) -> None:
        self.settings = settings
        self.store = store
        self.bound = settings.gateway.max_triage_lag
        self.refresh_s = settings.gateway.lag_refresh_s
        self.group = triage_group(settings)
        self.topic = settings.kafka.topic(settings.kafka.incoming_topic)
        self._clock = clock
        self._broker_lag = broker_lag
        self._lag_record = lag_record
        self._last: LagReading | None = None
        self._lock = asyncio.Lock()
        self._over = False

    async def reading(self) -> LagReading:
        last = self._last
        if last is not None and self._clock() - last.read_at < self.refresh_s:
            return last
        async with self._lock:
            last = self._last
            if last is not None and self._clock() - last.read_at < self.refresh_s:
                return last  # another request read it while this one waited
            self._last = await self._read()
            metrics.gateway_triage_lag.set(-1 if self._last.lag is None else self._last.lag)
            return self._last

    async def _read(self) -> LagReading:
        try:
            record = await self._lag_record(self.store, TRIAGE_ROLE)
        except RetryableError:
            record = None
        if record is not None and isinstance(record.get("lag"), int):
            return LagReading(record["lag"], "workers", self._clock())
        try:
            lags = await self._broker_lag(self.settings.kafka, self.group, self.topic,
                                          timeout_s=min(5.0, self.settings.kafka.request_timeout_s))
        except RetryableError as exc:
            logger.debug("gateway: triage lag unknown: %s", exc)
            return LagReading(None, "unknown", self._clock())
        return LagReading(sum(p.lag for p in lags), "broker", self._clock())

    async def over_bound(self) -> LagReading | None:
        """The reading when the lag is above ``gateway.max_triage_lag`` (then refuse new items), else None."""
        reading = await self.reading()
        over = reading.lag is not None and reading.lag > self.bound
        if over != self._over:  # one line per episode, not one per refused request
            self._over = over
            log = logger.warning if over else logger.info
            log("gateway: triage lag %s (%s, bound %d): %s new items", reading.lag, reading.source, self.bound,
                "refusing" if over else "accepting")
        return reading if over else None
