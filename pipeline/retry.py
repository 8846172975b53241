"""Bounded exponential backoff for retryable failures: the one retry loop every stage uses, and the pause a worker
takes while a dependency is down (:class:`Outages`).

Only :class:`~pipeline.errors.RetryableError` is retried (a permanent error is re-raised at once, as is any error
``give_up`` accepts, for example an open circuit breaker). After ``attempts`` tries the last error is re-raised for
the caller to route (review for the reasoner; a pause in :class:`Outages` for Redis and the broker; a dead letter
only for permanent causes).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from pipeline import metrics
from pipeline.errors import RetryableError

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Delay before retry ``n`` (1-based): ``initial_s * 2**(n-1)``, capped at ``max_s``.

    ``jitter`` draws each delay uniformly from [delay/2, delay], so that many callers failing together (every
    in-flight reasoner call when Triton restarts) do not retry in lockstep.
    """

    initial_s: float = 0.2
    max_s: float = 8.0
    jitter: bool = False

    def delay(self, retry: int) -> float:
        delay = min(self.initial_s * 2 ** (retry - 1), self.max_s)
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay


async def with_retries(
    operation: Callable[[int], Awaitable[T]],
    *,
    stage: str,
    attempts: int,
    backoff: Backoff = Backoff(),
    give_up: Callable[[RetryableError], bool] = lambda _: False,
) -> T:
    """Run ``operation(attempt)`` (attempt counts from 1); retry a RetryableError with ``backoff``, re-raise after
    ``attempts`` tries or when ``give_up(error)`` is true. Each retry is counted in ``modpipe_retries_total``."""
    for attempt in range(1, attempts + 1):
        try:
            return await operation(attempt)
        except RetryableError as exc:
            if give_up(exc):
                raise
            metrics.retries_total.labels(stage, type(exc).__name__).inc()
            if attempt == attempts:
                raise
            delay = backoff.delay(attempt)
            logger.warning("%s: %s (attempt %d/%d), retrying in %.2fs", stage, exc, attempt, attempts, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: attempts must be at least 1")


class WorkerStalled(Exception):
    """A dependency stayed down (or nothing moved) longer than the worker may wait: exit without acknowledging.

    Deliberately not a :class:`~pipeline.errors.ModpipeError`: nothing may turn it into a dead letter.
    """


class Outages:
    """Which dependencies a worker is waiting for: the pause, its bounded backoff, readiness and the signals.

    Work that fails because Redis, the broker or the model server is down is not condemned: the caller awaits
    :meth:`wait` (a pause whose length grows with the outage, up to ``backoff_max_s``) and tries the same work
    again; idempotent effects make the retry safe. While anything is down the worker is not ready
    (``on_ready(False)``; the agent stops taking new batches because the current one has not finished), the
    ``modpipe_dependency_up`` gauge says which dependency, and one log line names it when it goes and when it is
    back. A dependency down longer than ``stall_exit_s`` raises :class:`WorkerStalled`.
    """

    def __init__(
        self,
        *,
        backoff_max_s: float = 5.0,
        stall_exit_s: float = 300.0,
        on_ready: Callable[[bool], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backoff_max_s = backoff_max_s
        self.stall_exit_s = stall_exit_s
        self._on_ready = on_ready
        self._clock = clock
        self.down: dict[str, float] = {}  # dependency -> when it was first seen down
        self.pauses = 0

    @property
    def ready(self) -> bool:
        return not self.down

    async def wait(self, dependency: str, error: BaseException, where: str = "") -> None:
        """Pause after ``error`` showed ``dependency`` down; raise :class:`WorkerStalled` past the bound."""
        now = self._clock()
        since = self.down.get(dependency)
        if since is None:
            since = self.down[dependency] = now
            metrics.dependency_up.labels(dependency).set(0)
            logger.warning("%s unavailable (%s)%s: pausing, retrying with backoff for up to %.0f s", dependency,
                           error, f" at {where}" if where else "", self.stall_exit_s)
            if len(self.down) == 1 and self._on_ready is not None:
                self._on_ready(False)
        elapsed = now - since
        if elapsed > self.stall_exit_s:
            raise WorkerStalled(f"{dependency} unavailable for {elapsed:.0f} s (limit {self.stall_exit_s:.0f} s): {error}")
        self.pauses += 1
        metrics.outage_pauses_total.labels(dependency).inc()
        delay = min(self.backoff_max_s, max(0.2, elapsed / 2)) * random.uniform(0.5, 1.0)
        await asyncio.sleep(delay)

    def clear(self) -> None:
        """Work just succeeded: whatever was down is back."""
        if not self.down:
            return
        now = self._clock()
        for dependency, since in self.down.items():
            metrics.dependency_up.labels(dependency).set(1)
            logger.warning("%s available again after %.1f s: resuming", dependency, now - since)
        self.down.clear()
        if self._on_ready is not None:
            self._on_ready(True)
