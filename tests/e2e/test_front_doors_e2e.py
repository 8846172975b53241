"""The whole pipeline through its front doors: items in over HTTP, decisions out by webhook, on the real local stack.

Workers run as processes, as `modpipe demo` starts them (the real embedder, the CPU stand-in reasoner); the
gateway and the deliverer run in this process; the receiver is a real HTTP server on a loopback port.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from rich.console import Console

from pipeline.config import WebhookSettings
from pipeline.gateway.api import create_app
from pipeline.gateway.service import Gateway
from pipeline.harness.demo import pipeline_running
from pipeline.harness.traffic import sample_items
from pipeline.review.auth import Role, TokenStore
from pipeline.webhooks.deliverer import Deliverer
from pipeline.webhooks.registry import WebhookRegistry, delivery_id
from pipeline.webhooks.testing import ScriptedReceiver

pytestmark = pytest.mark.e2e

KEY = "e2e-webhook-signing-key"


def test_items_posted_to_the_gateway_are_decided_and_every_final_verdict_is_delivered_by_webhook(
    isolated_env,  # type: ignore[no-untyped-def]
) -> None:
    async def scenario() -> None:
        async with pipeline_running(isolated_env.state_dir, Console(quiet=True), "e2e-gw") as ctx:
            settings = ctx.settings.model_copy(update={"webhooks": WebhookSettings(
                signing_key=KEY, timeout_s=2.0, backoff_initial_s=0.1, backoff_max_s=0.5)})
            gateway = Gateway(settings)
            await gateway.start()
            token = await TokenStore(gateway.store).create("e2e", Role.PLATFORM)
            receiver = ScriptedReceiver()
            url = await receiver.start()
            hook = await WebhookRegistry(gateway.store, 3600).add("e2e", url, now=time.time() - 60)
            receiver.secret = hook.secret(KEY)
            deliverer = Deliverer(settings)
            delivering = asyncio.create_task(deliverer.run())
            items = sample_items(24, ctx.run_id, seed=5, distinct=True)
            bodies = [i.model_dump(mode="json", exclude={"platform", "schema_version"}) for i in items]
            try:
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(settings, gateway)),
                                             base_url="http://gateway",
                                             headers={"Authorization": f"Bearer {token}"}) as http:
                    accepted = await http.post("/v1/items", json={"items": bodies[:20]})
                    assert accepted.status_code == 202 and accepted.json()["accepted"] == 20, accepted.text
                    checks = await asyncio.gather(*(http.post("/v1/moderate?deadline_ms=8000", json=b)
                                                    for b in bodies[20:]))
                    assert all(c.status_code == 200 for c in checks)
                    ids = [i.content_id for i in items]
                    assert await ctx.observer.wait_settled(ids, 0, 600), "not every item settled in 600 s"
                    states = {cid: (await http.get(f"/v1/items/{cid}")).json() for cid in ids}
                finals = {cid: j.finals[0] for cid, j in ctx.observer.journeys.items() if cid in states and j.finals}
                assert finals, "the sample should have items decided by the pipeline"
                for cid, state in states.items():
                    verdict = finals.get(cid)
                    if verdict is None:
                        assert state["decision"] == "hidden_pending"  # waiting for a reviewer: stays hidden
                    else:
                        assert state["final"] and state["verdict"]["verdict_id"] == verdict.verdict_id
                        assert state["decision"] == verdict.decision.value
                        assert verdict.platform == "e2e"
                # Every final verdict reaches the platform, signed, exactly the ones the pipeline published.
                wanted = {delivery_id("e2e", v.verdict_id) for v in finals.values()}

                def delivered() -> set[str]:
                    return {d.delivery_id for d in receiver.accepted()}

                deadline = time.monotonic() + 60
                while not wanted <= delivered() and time.monotonic() < deadline:
                    await asyncio.sleep(0.1)
                assert delivered() == wanted
                assert all(r.signature_ok for r in receiver.received)
                for d in receiver.accepted():
                    assert d.verdict.verdict_id == finals[d.content_id].verdict_id
            finally:
                deliverer.stop()
                await asyncio.wait_for(delivering, 30)
                await receiver.stop()
                await gateway.stop()

    asyncio.run(scenario())
