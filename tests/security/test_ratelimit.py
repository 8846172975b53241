"""Per-client token buckets (pipeline.http.ratelimit): one scenario suite, run on the in-memory limiter and on Redis.

The clock is the test's, so nothing here depends on how fast the machine is.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from pipeline.config import RedisSettings
from pipeline.http.ratelimit import InMemoryRateLimiter, Limit, RedisRateLimiter
from pipeline.store import RedisStore
from pipeline.store.keys import Namespace

LOGIN = Limit("login", 6)  # one every 10 s, bursts of 6
FAILURES = Limit("auth_failures", 3)


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


Scenario = Callable[[object, Clock], Awaitable[None]]


@pytest.fixture(params=[pytest.param("memory", marks=pytest.mark.unit),
                        pytest.param("redis", marks=pytest.mark.integration)])
def drive(request, unique_prefix: str) -> Callable[[Scenario], None]:  # type: ignore[no-untyped-def]
    """Run a scenario against a fresh limiter of this kind, with a clock the scenario moves."""
    redis_url = request.getfixturevalue("kafka_stack").redis_url if request.param == "redis" else None

    def run(scenario: Scenario) -> None:
        async def go() -> None:
            clock = Clock()
            if redis_url is None:
                await scenario(InMemoryRateLimiter(clock=clock), clock)
                return
            store = RedisStore(RedisSettings(url=redis_url, key_prefix=unique_prefix))
            try:
                await scenario(RedisRateLimiter(store, clock=clock), clock)
            finally:
                await store.close()

        asyncio.run(go())

    return run


async def hits(rl, limit: Limit, client: str, n: int) -> list[bool]:  # type: ignore[no-untyped-def]
    return [(await rl.hit(limit, client)).allowed for _ in range(n)]


def test_a_burst_is_allowed_then_refused_until_a_token_refills(drive) -> None:  # type: ignore[no-untyped-def]
    async def scenario(rl, clock) -> None:  # type: ignore[no-untyped-def]
        assert await hits(rl, LOGIN, "10.0.0.1", 6) == [True] * 6
        first = await rl.hit(LOGIN, "10.0.0.1")
        again = await rl.hit(LOGIN, "10.0.0.1")
        assert not first.allowed and first.first_refusal and first.retry_after_s == pytest.approx(10.0)
        assert not again.allowed and not again.first_refusal  # one log line per episode
        clock.now += 5
        assert (await rl.hit(LOGIN, "10.0.0.1")).retry_after_s == pytest.approx(5.0)
        clock.now += 5
        assert await hits(rl, LOGIN, "10.0.0.1", 2) == [True, False]
        assert (await rl.check(LOGIN, "10.0.0.1")).allowed is False
        clock.now += 10
        assert await hits(rl, LOGIN, "10.0.0.1", 1) == [True]
        refused = await rl.hit(LOGIN, "10.0.0.1")
        assert not refused.allowed and refused.first_refusal  # a new episode after the client was let in again

    drive(scenario)


def test_a_bucket_never_holds_more_than_its_burst(drive) -> None:  # type: ignore[no-untyped-def]
    async def scenario(rl, clock) -> None:  # type: ignore[no-untyped-def]
        await hits(rl, LOGIN, "c", 6)
        clock.now += 3600
        assert await hits(rl, LOGIN, "c", 7) == [True] * 6 + [False]

    drive(scenario)


def test_check_spends_nothing_and_flags_the_first_refusal(drive) -> None:  # type: ignore[no-untyped-def]
    async def scenario(rl, clock) -> None:  # type: ignore[no-untyped-def]
        for _ in range(10):
            assert (await rl.check(FAILURES, "c")).allowed
        assert await hits(rl, FAILURES, "c", 4) == [True, True, True, False]
        later = [await rl.check(FAILURES, "c") for _ in range(3)]
        assert [a.allowed for a in later] == [False] * 3 and [a.first_refusal for a in later] == [False] * 3
        clock.now += 20
        assert (await rl.check(FAILURES, "c")).allowed

    drive(scenario)


def test_clients_and_limits_have_their_own_buckets(drive) -> None:  # type: ignore[no-untyped-def]
    async def scenario(rl, clock) -> None:  # type: ignore[no-untyped-def]
        assert (await hits(rl, FAILURES, "10.0.0.1", 4))[-1] is False
        assert await hits(rl, FAILURES, "10.0.0.2", 3) == [True] * 3
        assert await hits(rl, LOGIN, "10.0.0.1", 1) == [True]
        assert await hits(rl, FAILURES, "::1", 4) == [True] * 3 + [False]

    drive(scenario)


def test_a_clock_going_back_refills_nothing(drive) -> None:  # type: ignore[no-untyped-def]
    async def scenario(rl, clock) -> None:  # type: ignore[no-untyped-def]
        await hits(rl, FAILURES, "c", 3)
        clock.now -= 3600
        assert await hits(rl, FAILURES, "c", 1) == [False]
        clock.now += 3600 + 20
        assert await hits(rl, FAILURES, "c", 1) == [True]

    drive(scenario)


def test_limits_must_allow_something() -> None:
    with pytest.raises(ValueError):
        Limit("x", 0)


@pytest.mark.integration
def test_buckets_live_under_their_namespace_whatever_the_client_string(kafka_stack, unique_prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix))
        rl = RedisRateLimiter(store, clock=Clock())
        hostile = ["review:tokens", "login:x", "a:b:c", "%3A", "tokens", "日本", "x" * 300]
        for client in hostile:
            await rl.hit(FAILURES, client)
        keys = sorted(k.decode() for k in await store.redis.keys(unique_prefix + "*"))
        assert len(keys) == len(hostile)
        expected = sorted(store.key(Namespace.RATE_LIMIT, "auth_failures", c) for c in hostile)
        assert keys == expected
        for key in keys:
            assert key.startswith(unique_prefix + "ratelimit:auth_failures:")
            assert key.count(":") == unique_prefix.count(":") + 2  # the client part never adds a separator
            assert 0 < await store.redis.ttl(key) <= FAILURES.ttl_s
        await store.close()

    asyncio.run(scenario())
