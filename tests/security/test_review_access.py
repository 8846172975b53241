"""Least privilege: a platform token reads and appeals only its own platform's items; queues, stats and exports are
for reviewers and admins; revoking a token ends the web sessions opened with it.

The hole (found by an outside tester): any platform token could read any item's verdict, the queues and the stats.
An item whose verdict names no platform (ContentItem.platform unset) belongs to no platform: only reviewers and
admins read it.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.review.auth import Role
from pipeline.schemas import Decision, Stage, Verdict

pytestmark = pytest.mark.integration

CSRF = {"X-Modpipe-CSRF": "1"}


async def decided(env, cid: str, platform: str | None) -> Verdict:  # type: ignore[no-untyped-def]
    verdict = Verdict.final(cid, Decision.BLOCK, Stage.TRIAGE, platform=platform)
    await env.service.effects.verdict(verdict)
    return verdict


def test_a_platform_reads_only_its_own_items(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            await decided(env, "shop-1", "shop")
            await decided(env, "forum-1", "forum")
            await decided(env, "nobody-1", None)
            own = await env.http.get("/v1/content/shop-1", headers=env.auth("shop"))
            assert own.status_code == 200 and own.json()["verdict"]["platform"] == "shop"
            unknown = await env.http.get("/v1/content/never-seen", headers=env.auth("shop"))
            for cid in ("forum-1", "nobody-1"):
                foreign = await env.http.get(f"/v1/content/{cid}", headers=env.auth("shop"))
                # the same answer as for an unknown item: no oracle for what other platforms have
                assert foreign.status_code == 404, cid
                assert foreign.json() == {**unknown.json(), "error": unknown.json()["error"].replace("never-seen", cid)}
            for who in ("alice", "admin"):  # reviewers and admins read every item
                for cid in ("shop-1", "forum-1", "nobody-1"):
                    assert (await env.http.get(f"/v1/content/{cid}", headers=env.auth(who))).status_code == 200

    asyncio.run(scenario())


def test_a_platform_appeals_only_its_own_items(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            await decided(env, "forum-2", "forum")
            await decided(env, "nobody-2", None)
            await decided(env, "shop-2", "shop")
            unknown = await env.http.post("/v1/appeals", headers=env.auth("shop"), json={"content_id": "never-seen"})
            for cid in ("forum-2", "nobody-2"):
                item = {"content_id": cid, "text": "appealed text", "platform": "shop"}
                foreign = await env.http.post("/v1/appeals", headers=env.auth("shop"), json={"content_id": cid, "item": item})
                assert foreign.status_code == unknown.status_code == 409, cid
            # An appeal cannot move an item to another platform.
            moved = {"content_id": "shop-2", "text": "appealed text", "platform": "forum"}
            wrong = await env.http.post("/v1/appeals", headers=env.auth("shop"), json={"content_id": "shop-2", "item": moved})
            assert wrong.status_code == 422 and wrong.json()["fields"][0]["field"] == "body.item.platform"
            # Without a platform on the item, the appealed verdict's platform is kept.
            item = {"content_id": "shop-2", "text": "appealed text"}
            filed = await env.http.post("/v1/appeals", headers=env.auth("shop"), json={"content_id": "shop-2", "item": item})
            assert filed.status_code == 202, filed.text
            task = (await env.service.queue.get("shop-2")).task
            assert task.item.platform == "shop"
            # The outcome of the appeal is the platform's again.
            view = (await env.http.post("/v1/claims", headers=env.auth("alice"))).json()
            assert view["content_id"] == "shop-2"
            outcome = await env.http.post("/v1/items/shop-2/decision", headers=env.auth("alice"),
                                          json={"decision": "allow", "policy_id": "hate"})
            assert outcome.status_code == 200 and outcome.json()["platform"] == "shop"
            shown = await env.http.get("/v1/content/shop-2", headers=env.auth("shop"))
            assert shown.status_code == 200 and shown.json()["state"] == "VISIBLE"
            # Admins appeal any item.
            admin = await env.http.post("/v1/appeals", headers=env.auth("admin"),
                                        json={"content_id": "forum-2", "item": {"content_id": "forum-2", "text": "t"}})
            assert admin.status_code == 202, admin.text

    asyncio.run(scenario())


def test_queues_stats_and_exports_are_not_for_platforms(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            for method, path in (("GET", "/v1/queues"), ("GET", "/v1/stats"), ("GET", "/v1/export"),
                                 ("POST", "/v1/claims"), ("GET", "/v1/items/x"), ("GET", "/v1/items/x/content"),
                                 ("POST", "/v1/tokens"), ("DELETE", "/v1/tokens/alice")):
                response = await env.http.request(method, path, headers=env.auth("shop"),
                                                  json={"principal_id": "p", "role": "admin"} if path == "/v1/tokens" else None)
                assert response.status_code == 403, (method, path, response.text)
            assert (await env.http.get("/v1/queues", headers=env.auth("alice"))).status_code == 200
            assert (await env.http.get("/v1/stats", headers=env.auth("alice"))).status_code == 200
            assert (await env.http.get("/v1/me", headers=env.auth("shop"))).json() == {
                "principal_id": "shop", "role": "platform", "platform": "shop"}

    asyncio.run(scenario())


def test_revoking_a_token_ends_its_open_sessions(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            carol = await env.service.tokens.create("carol", Role.REVIEWER)
            async with env.client("10.0.1.1") as page, env.client("10.0.1.2") as other_page:
                assert (await page.post("/v1/login", json={"token": carol})).status_code == 200
                assert (await other_page.post("/v1/login", json={"token": env.tokens["alice"]})).status_code == 200
                assert (await page.get("/v1/me")).json()["principal_id"] == "carol"
                revoked = await env.http.delete("/v1/tokens/carol", headers=env.auth("admin"))
                assert revoked.status_code == 200 and revoked.json() == {"principal_id": "carol", "revoked": 1}
                assert (await page.get("/v1/me")).status_code == 401
                assert (await page.post("/v1/claims", headers=CSRF)).status_code == 401
                assert (await page.get("/", follow_redirects=False)).status_code == 303  # back to the login page
                assert (await other_page.get("/v1/me")).status_code == 200  # other principals keep theirs
                # The same through the operator's path (modpipe review token revoke, straight on Redis).
                assert await env.service.tokens.revoke("alice") == 1
                assert (await other_page.get("/v1/me")).status_code == 401

    asyncio.run(scenario())


def test_platform_tokens_name_their_platform(review_env) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with review_env() as env:
            made = await env.http.post("/v1/tokens", headers=env.auth("admin"),
                                       json={"principal_id": "shop-app", "role": "platform", "platform": "shop"})
            assert made.status_code == 201 and made.json()["platform"] == "shop"
            token = made.json()["token"]
            assert (await env.http.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).json()["platform"] == "shop"
            default = await env.http.post("/v1/tokens", headers=env.auth("admin"),
                                          json={"principal_id": "blog", "role": "platform"})
            assert default.json()["platform"] == "blog"  # the principal id, when not given
            bad = await env.http.post("/v1/tokens", headers=env.auth("admin"),
                                      json={"principal_id": "rev", "role": "reviewer", "platform": "shop"})
            assert bad.status_code == 422
            listed = {row["id"]: row for row in await env.service.tokens.list()}
            assert listed["shop-app"]["platform"] == "shop" and listed["alice"].get("platform") is None

    asyncio.run(scenario())
