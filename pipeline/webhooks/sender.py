"""One delivery attempt over HTTP, and how long to wait before the next one.

An attempt succeeds on any 2xx. Anything else is retried: other statuses (redirects are not followed), a timeout
(``webhooks.timeout_s`` for connecting, sending and the answer) and a connection error. The answer's body is
never read (a hostile endpoint cannot make the deliverer hold a large body). Between attempts the delay doubles
from ``webhooks.backoff_initial_s`` up to ``webhooks.backoff_max_s``, with +-20 % jitter so that a platform
coming back is not hit by every retry at once; a ``Retry-After`` (seconds) on a 429 or 503 is honoured up to the
same maximum. ``webhooks.concurrency`` bounds the requests in flight.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from pipeline import metrics
from pipeline.config import WebhookSettings
from pipeline.schemas import WebhookDelivery
from pipeline.webhooks.signing import ATTEMPT_HEADER, DELIVERY_HEADER, EVENT_HEADER, SIGNATURE_HEADER, sign

USER_AGENT = "modpipe-webhooks/1"


@dataclass(frozen=True)
class Attempt:
    ok: bool
    result: str  # ok, http_error, timeout, connect_error (the attempts metric's label)
    status: int | None
    error: str  # what went wrong, in words (never the body)
    retry_after_s: float | None = None


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: the backoff applies


class Sender:
    """Signs and POSTs deliveries; :meth:`delay` is the wait before attempt ``n + 1``."""

    def __init__(self, settings: WebhookSettings, client: httpx.AsyncClient | None = None,
                 rng: random.Random | None = None) -> None:
        self.settings = settings
        self._owned = client is None
        self._client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(settings.timeout_s), follow_redirects=False,
            limits=httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency),
            headers={"User-Agent": USER_AGENT},
        )
        self._slots = asyncio.Semaphore(settings.concurrency)
        self._rng = rng or random.Random()

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def attempt(self, url: str, secret: str, delivery: WebhookDelivery, number: int) -> Attempt:
        body = delivery.model_dump_json().encode("utf-8")
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, body),
            DELIVERY_HEADER: delivery.delivery_id,
            EVENT_HEADER: delivery.event.value,
            ATTEMPT_HEADER: str(number),
        }
        host = urlsplit(url).hostname
        async with self._slots:
            try:
                async with self._client.stream("POST", url, content=body, headers=headers) as answer:
                    status = answer.status_code
                    retry_after = _retry_after(answer.headers.get("retry-after"))
            except httpx.TimeoutException:
                return self._counted(Attempt(False, "timeout", None,
                                             f"{host}: no answer within {self.settings.timeout_s:g}s"))
            except httpx.HTTPError as exc:
                return self._counted(Attempt(False, "connect_error", None, f"{host}: {type(exc).__name__}"))
        if 200 <= status < 300:
            return self._counted(Attempt(True, "ok", status, ""))
        return self._counted(Attempt(False, "http_error", status, f"{host}: HTTP {status}",
                                     retry_after if status in (429, 503) else None))

    @staticmethod
    def _counted(attempt: Attempt) -> Attempt:
        metrics.webhook_attempts_total.labels(attempt.result).inc()
        return attempt

    def delay(self, number: int, attempt: Attempt | None = None) -> float:
        """Seconds to wait after failed attempt ``number`` (1-based)."""
        s = self.settings
        base = min(s.backoff_max_s, s.backoff_initial_s * 2 ** (number - 1))
        wait = base * self._rng.uniform(0.8, 1.2)
        if attempt is not None and attempt.retry_after_s is not None:
            wait = max(wait, min(attempt.retry_after_s, s.backoff_max_s))
        return min(wait, s.backoff_max_s)
