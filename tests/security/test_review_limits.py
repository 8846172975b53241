"""Bounded requests on the review service: bodies capped before parsing, errors that never echo, text limits,
per-client rate limits on login and on failed authentication.

The holes (found by an outside tester): an unauthenticated 100 MB POST to ``/v1/login`` came back whole in the 422
(four in parallel took the service from 109 MB to 1.28 GB); ``POST /v1/appeals`` took 30 MB of text past the
20,000-character limit; 300 wrong logins in 1.1 s met no limit. The real-socket version (memory of a served process,
chunked bodies) is in test_review_abuse_bench.py.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from prometheus_client import REGISTRY

from pipeline.config import Settings
from pipeline.schemas import Decision, Stage, Verdict

pytestmark = pytest.mark.integration

SENTINEL = "SENTINEL-INPUT-93be"


def sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_an_oversized_login_body_is_refused_unread_and_small(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            big = b'{"token": "' + SENTINEL.encode() * (2 * 1024 * 1024 // len(SENTINEL)) + b'"}'
            response = await env.http.post("/v1/login", content=big, headers={"content-type": "application/json"})
            assert response.status_code == 413
            assert len(response.content) < 512 and SENTINEL not in response.text
            assert response.json()["limit_bytes"] == Settings().http.max_body_bytes

    asyncio.run(scenario())


def test_validation_errors_name_the_field_and_never_echo_the_input(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            long_token = await env.http.post("/v1/login", json={"token": SENTINEL * 100})
            assert long_token.status_code == 422
            assert SENTINEL not in long_token.text
            assert [f["field"] for f in long_token.json()["fields"]] == ["body.token"]
            assert "body.token" in long_token.json()["error"]
            extra = await env.http.post("/v1/login", json={"token": "x", SENTINEL: SENTINEL})
            assert extra.status_code == 422 and SENTINEL not in extra.text
            broken = await env.http.post("/v1/login", content=b'{"token": "' + SENTINEL.encode(),
                                         headers={"content-type": "application/json"})
            assert broken.status_code == 422 and SENTINEL not in broken.text
            decision = await env.http.post("/v1/items/x/decision", headers=env.auth("alice"),
                                           json={"decision": SENTINEL, "policy_id": "hate"})
            assert decision.status_code == 422 and SENTINEL not in decision.text
            assert [f["field"] for f in decision.json()["fields"]] == ["body.decision"]

    asyncio.run(scenario())


def test_an_appeal_cannot_carry_text_past_the_limit(review_env, review_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    limit = review_settings.triage.max_text_chars

    async def scenario() -> None:
        async with review_env() as env:
            auto = Verdict.final("ap-big", Decision.BLOCK, Stage.TRIAGE, platform="shop")
            await env.service.effects.verdict(auto)

            def appeal(text: str) -> dict:
                return {"content_id": "ap-big", "item": {"content_id": "ap-big", "text": text, "platform": "shop"}}

            huge = await env.http.post("/v1/appeals", headers=env.auth("shop"), json=appeal("x" * 30_000_000))
            assert huge.status_code == 413 and len(huge.content) < 512
            over = await env.http.post("/v1/appeals", headers=env.auth("shop"), json=appeal("y" * (limit + 1)))
            assert over.status_code == 422, over.text
            assert [f["field"] for f in over.json()["fields"]] == ["body.item.text"]
            assert "yyyy" not in over.text
            # The longest allowed text, even as JSON's worst case (every character escaped), is accepted.
            at_limit = await env.http.post("/v1/appeals", headers=env.auth("shop"), json=appeal("\x01" * limit))
            assert at_limit.status_code == 202, at_limit.text

    asyncio.run(scenario())


def test_wrong_logins_are_rate_limited_per_client_with_a_metric_and_a_log_line(
    review_env, review_settings: Settings, caplog  # type: ignore[no-untyped-def]
) -> None:
    allowed = review_settings.http.login_per_minute
    wrong = "mpr_" + SENTINEL

    async def scenario() -> None:
        before = sample("modpipe_rate_limited_total", {"service": "review", "limit": "login"})
        async with review_env(client="10.0.0.7") as env:
            statuses = [(await env.http.post("/v1/login", json={"token": wrong})).status_code for _ in range(300)]
            assert statuses[:allowed] == [401] * allowed
            assert set(statuses[allowed:]) == {429}
            refused = await env.http.post("/v1/login", json={"token": env.tokens["alice"]})
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
            # Another client is not affected.
            async with env.client("10.0.0.8") as other:
                assert (await other.post("/v1/login", json={"token": env.tokens["alice"]})).status_code == 200
        after = sample("modpipe_rate_limited_total", {"service": "review", "limit": "login"})
        assert after - before == 300 - allowed + 1

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    limited = [r for r in caplog.records if "rate limit" in r.getMessage()]
    assert len(limited) == 1 and "10.0.0.7" in limited[0].getMessage()  # once per episode, naming the client
    assert SENTINEL not in caplog.text  # never the token


def test_failed_bearer_authentication_is_rate_limited_per_client(review_env, review_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    budget = review_settings.http.auth_failures_per_minute

    async def scenario() -> None:
        before = sample("modpipe_auth_failures_total", {"service": "review", "credential": "token"})
        async with review_env(client="10.0.0.9") as env:
            statuses = [
                (await env.http.get("/v1/queues", headers={"Authorization": f"Bearer mpr_guess{i}"})).status_code
                for i in range(100)
            ]
            assert statuses[:budget] == [401] * budget and set(statuses[budget:]) == {429}
            # While the client is over its budget, no credential is even checked: guessing gains nothing.
            assert (await env.http.get("/v1/queues", headers=env.auth("alice"))).status_code == 429
            async with env.client("10.0.0.10") as other:
                assert (await other.get("/v1/queues", headers=env.auth("alice"))).status_code == 200
        failures = sample("modpipe_auth_failures_total", {"service": "review", "credential": "token"}) - before
        assert failures == budget

    asyncio.run(scenario())


def test_a_valid_request_never_counts_against_the_client(review_env, review_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env(client="10.0.0.11") as env:
            for _ in range(review_settings.http.auth_failures_per_minute * 3):
                assert (await env.http.get("/v1/me", headers=env.auth("alice"))).status_code == 200

    asyncio.run(scenario())


def test_concurrent_guesses_never_get_more_answers_than_the_budget(review_env, review_settings: Settings) -> None:  # type: ignore[no-untyped-def]
    budget = review_settings.http.auth_failures_per_minute

    async def scenario() -> None:
        async with review_env(client="10.0.0.12") as env:
            # All 200 pass the budget check together; each failure is spent atomically, so only `budget` say 401.
            answers = await asyncio.gather(*(
                env.http.get("/v1/me", headers={"Authorization": f"Bearer mpr_guess{i}"}) for i in range(200)))
            statuses = [a.status_code for a in answers]
            assert statuses.count(401) == budget and statuses.count(429) == 200 - budget

    asyncio.run(scenario())
