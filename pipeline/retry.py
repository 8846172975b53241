"""Bounded exponential backoff for retryable failures: the one retry loop every stage uses.

Only :class:`~pipeline.errors.RetryableError` is retried (a permanent error is re-raised at once, as is any error
``give_up`` accepts, for example an open circuit breaker). After ``attempts`` tries the last error is re-raised for
the caller to route (review, pause, or dead letter for permanent causes).
"""

from __future__ import annotations

import asyncio
import logging
import random
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
