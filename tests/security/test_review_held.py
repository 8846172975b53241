"""What held when an outside tester attacked the review service, kept as regression tests.

Every ``/v1`` route demands authentication (401; enumerated from the app, so a new route is covered without a new
test), reviewers are refused admin routes (403), nobody decides what they do not hold (409), an expired lease gives
the item back, cookie writes need the CSRF header, the session cookie is HttpOnly and SameSite=Strict, paths cannot
climb out of the static folder, hostile ids stay ids, and the content text never reaches INFO logs.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import pytest

from pipeline.harness.review import sample_task
from pipeline.schemas import Decision, ReviewDecision, Stage, Verdict

pytestmark = pytest.mark.integration

CSRF = {"X-Modpipe-CSRF": "1"}


def v1_routes(app) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    out = []
    for route in app.routes:
        path = getattr(route, "path", "")
        if not path.startswith("/v1/") or path == "/v1/login":
            continue
        concrete = re.sub(r"\{[^}]+\}", "held-1", path)
        out.extend((method, concrete) for method in sorted(getattr(route, "methods", set()) - {"HEAD"}))
    return out


def test_every_v1_route_needs_a_valid_credential(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            routes = v1_routes(env.app)
            assert len(routes) >= 17  # the enumeration found the API
            async with env.client("10.0.2.1") as anonymous, env.client("10.0.2.2") as guesser, \
                    env.client("10.0.2.3") as forger:
                forger.cookies.set("modpipe_session", "forged")
                for method, path in routes:
                    assert (await anonymous.request(method, path)).status_code == 401, (method, path)
                for method, path in routes[:15]:  # within the failed-authentication budget
                    bad = await guesser.request(method, path, headers={"Authorization": "Bearer mpr_nope"})
                    assert bad.status_code == 401, (method, path)
                    forged = await forger.request(method, path, headers={"X-Modpipe-CSRF": "1"})
                    assert forged.status_code == 401, (method, path)

    asyncio.run(scenario())


def test_reviewers_are_refused_admin_routes(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            assert (await env.http.get("/v1/export", headers=env.auth("alice"))).status_code == 403
            made = await env.http.post("/v1/tokens", headers=env.auth("alice"), json={"principal_id": "x", "role": "admin"})
            assert made.status_code == 403
            assert (await env.http.delete("/v1/tokens/bob", headers=env.auth("alice"))).status_code == 403
            assert (await env.http.post("/v1/appeals", headers=env.auth("alice"), json={"content_id": "x"})).status_code == 403

    asyncio.run(scenario())


def test_nobody_decides_what_they_do_not_hold(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            q = env.service.queue
            await q.enqueue(sample_task("held-1"))
            body = {"decision": "allow", "policy_id": "hate"}
            assert (await env.http.post("/v1/items/held-1/decision", headers=env.auth("alice"), json=body)).status_code == 409
            assert (await env.http.post("/v1/claims", headers=env.auth("alice"))).json()["content_id"] == "held-1"
            for path in ("decision", "skip", "release", "escalate"):
                response = await env.http.post(f"/v1/items/held-1/{path}", headers=env.auth("bob"),
                                               json=body if path == "decision" else None)
                assert response.status_code == 409, path
            assert (await env.http.get("/v1/items/held-1/content", headers=env.auth("bob"))).status_code == 409

    asyncio.run(scenario())


def test_an_expired_lease_gives_the_item_back_and_voids_the_old_holder(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            q = env.service.queue
            await q.enqueue(sample_task("lease-1"))
            t0 = time.time() + 3600  # ahead of the service's own reaper
            first = await q.claim("alice", 10, now=t0)
            assert first is not None and first.content_id == "lease-1"
            second = await q.claim("bob", 10, now=t0 + 11)
            assert second is not None and second.content_id == "lease-1"
            entry = ReviewDecision(decision_id="d", content_id="lease-1", task_id="t", action="decide",
                                   actor_id="alice", actor_role="reviewer")
            outcome, _, _ = await q.record_decision("lease-1", "alice", "{}", entry, now=t0 + 12)
            assert outcome.value == "not_held"

    asyncio.run(scenario())


def test_cookie_sessions_are_httponly_strict_and_writes_need_the_csrf_header(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            async with env.client("10.0.2.3") as page:
                login = await page.post("/v1/login", json={"token": env.tokens["alice"]})
                cookie = login.headers["set-cookie"].lower()
                assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
                assert env.tokens["alice"] not in login.headers["set-cookie"]  # a session id, never the token
                assert (await page.post("/v1/claims")).status_code == 403  # no CSRF header
                assert (await page.post("/v1/claims", headers=CSRF)).status_code == 204
                assert (await page.get("/v1/queues")).status_code == 200  # reads need no header

    asyncio.run(scenario())


def test_paths_cannot_leave_the_static_folder(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            assert (await env.http.get("/static/app.js")).status_code == 200
            for path in ("/static/../api.py", "/static/%2e%2e/api.py", "/static/..%2fapi.py",
                         "/static/%2e%2e/%2e%2e/config.py", "/static//etc/passwd", "/static/..%5capi.py"):
                response = await env.http.get(path)
                assert response.status_code == 404, (path, response.status_code)
                assert b"create_app" not in response.content

    asyncio.run(scenario())


def test_hostile_ids_stay_ids(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            await env.service.effects.verdict(Verdict.final("tokens", Decision.ALLOW, Stage.TRIAGE))
            assert (await env.http.get("/v1/content/tokens", headers=env.auth("admin"))).json()["content_id"] == "tokens"
            for cid in ("review:tokens", "appeal:victim:1", "a%3Ab"):
                assert (await env.http.get(f"/v1/content/{cid}", headers=env.auth("admin"))).status_code in (404, 422)
            assert (await env.http.get("/v1/me", headers=env.auth("alice"))).status_code == 200  # tokens intact
            assert {row["id"] for row in await env.service.tokens.list()} >= {"alice", "bob", "shop", "forum"}

    asyncio.run(scenario())


def test_content_text_never_reaches_info_logs(review_env, caplog) -> None:  # type: ignore[no-untyped-def]
    secret = "SENTINEL-CONTENT-5d21 never log me"

    async def scenario() -> None:
        async with review_env() as env:
            await env.service.queue.enqueue(sample_task("log-1", text=secret))
            assert (await env.http.post("/v1/claims", headers=env.auth("alice"))).status_code == 200
            assert (await env.http.get("/v1/items/log-1/content", headers=env.auth("alice"))).json()["text"] == secret
            decided = await env.http.post("/v1/items/log-1/decision", headers=env.auth("alice"),
                                          json={"decision": "allow", "policy_id": "hate"})
            assert decided.status_code == 200

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    assert "log-1" in caplog.text and secret not in caplog.text
