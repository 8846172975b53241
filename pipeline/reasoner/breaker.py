"""A circuit breaker in front of the reasoning model."""

from __future__ import annotations

import logging
import time

from pipeline import metrics
from pipeline.errors import ReasonerUnavailable

logger = logging.getLogger(__name__)


class CircuitOpen(ReasonerUnavailable):
    """The breaker is open: the call was not attempted (retrying it now would fail fast again)."""


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive transport failures; open fails fast for ``reset_s``; then one
    trial call is let through (half-open): success closes it, failure opens it again.

    Why: when Triton is down, every item would otherwise wait out timeouts and retries, piling up in-flight calls
    and consumer lag; failing fast sends those items to review (fail closed) at once.
    """

    def __init__(self, failures: int, reset_s: float, clock=time.monotonic):  # type: ignore[no-untyped-def]
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def before_call(self) -> None:
        """Raise ReasonerUnavailable when the breaker is open (or its single trial call is already out)."""
        state = self.state
        if state == "open" or (state == "half_open" and self._trial_in_flight):
            raise CircuitOpen("circuit breaker open: the reasoner failed repeatedly; failing fast")
        if state == "half_open":
            self._trial_in_flight = True

    def record_success(self) -> None:
        if self._opened_at is not None:
            logger.info("reasoner circuit breaker closed")
        self._consecutive, self._opened_at, self._trial_in_flight = 0, None, False
        metrics.reasoner_circuit_open.set(0)

    def record_failure(self) -> None:
        self._consecutive += 1
        self._trial_in_flight = False
        if self._opened_at is not None or self._consecutive >= self.failures:
            if self._opened_at is None:
                logger.warning("reasoner circuit breaker open after %d consecutive failures", self._consecutive)
            self._opened_at = self._clock()
            metrics.reasoner_circuit_open.set(1)
