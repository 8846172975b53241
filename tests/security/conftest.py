"""The review service in process (real broker and Redis from the session stack) for the abuse tests.

``review_env(client=...)`` opens the service and an HTTP client over the ASGI app; ``client`` is the address the
app sees the requests come from (per-client rate limits count by it). The rate limiter's clock stands still unless a
test passes one, so no budget refills while a test runs, however slow the machine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from pipeline.broker import ensure_topics
from pipeline.config import HttpSettings, KafkaSettings, RedisSettings, ReviewSettings, Settings
from pipeline.http.ratelimit import RedisRateLimiter
from pipeline.review.api import create_app
from pipeline.review.auth import Role
from pipeline.review.service import ReviewService

ADMIN = "admin-bootstrap-token-for-security-tests"
# principal -> (role, platform)
PRINCIPALS: dict[str, tuple[Role, str | None]] = {
    "alice": (Role.REVIEWER, None),
    "bob": (Role.REVIEWER, None),
    "shop": (Role.PLATFORM, "shop"),
    "forum": (Role.PLATFORM, "forum"),
}


@dataclass
class ReviewEnv:
    service: ReviewService
    app: Any
    http: httpx.AsyncClient
    tokens: dict[str, str] = field(default_factory=dict)

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    def client(self, address: str) -> httpx.AsyncClient:
        """Another HTTP client on the same app, seen as coming from ``address`` (close it after use)."""
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app, client=(address, 40000)),
                                 base_url="http://review")


@pytest.fixture
def review_settings(kafka_stack, unique_prefix, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=1),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
        review=ReviewSettings(admin_token=ADMIN, claim_ttl_s=60),
        http=HttpSettings(login_per_minute=10, auth_failures_per_minute=20),
    )


@pytest.fixture
def review_env(review_settings: Settings) -> Callable[..., Any]:
    @asynccontextmanager
    async def running(client: str = "10.0.0.1", settings: Settings | None = None,
                      clock: Callable[[], float] = lambda: 1_000_000.0) -> AsyncIterator[ReviewEnv]:
        config = settings or review_settings
        await ensure_topics(config.kafka)
        service = ReviewService(config, relay_interval_s=0.05)
        await service.start()
        app = create_app(config, service, limiter=RedisRateLimiter(service.store, clock=clock))
        tokens = {"admin": ADMIN}
        for who, (role, platform) in PRINCIPALS.items():
            tokens[who] = await service.tokens.create(who, role, platform=platform)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app, client=(client, 40000)),
                                         base_url="http://review") as http:
                yield ReviewEnv(service, app, http, tokens)
        finally:
            await service.stop()

    return running
