"""The drop-in moderation API, driven by the official ``openai`` Python SDK told only a base URL and a key.

The gateway runs under uvicorn on a free loopback port (real HTTP), with the triage role's real handler behind it
(:class:`pipeline.gateway.testing.TriagePump`) on a real broker and Redis.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import openai
import pytest
import uvicorn

from pipeline.broker import ensure_topics
from pipeline.config import GatewaySettings, KafkaSettings, RedisSettings, Settings
from pipeline.gateway.api import create_app
from pipeline.gateway.moderations import OPENAI_CATEGORIES
from pipeline.gateway.service import Gateway
from pipeline.gateway.testing import ALLOW, BLOCK_VIOLENCE, ESCALATE, TriagePump
from pipeline.review.auth import Role, TokenStore

pytestmark = pytest.mark.integration

SCRIPT = {"have a lovely day": ALLOW, "i will hurt you": BLOCK_VIOLENCE, "is this a threat?": ESCALATE}


@pytest.fixture
def settings(kafka_stack, unique_prefix, tmp_path) -> Settings:  # type: ignore[no-untyped-def]
    return Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=2,
                            session_timeout_s=2.0, heartbeat_interval_s=0.5),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
        gateway=GatewaySettings(moderate_deadline_ms=1500, poll_interval_ms=20),
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def serving(settings: Settings) -> AsyncIterator[tuple[str, str]]:
    """(base URL, platform token) of a gateway served over HTTP with a triage worker behind it."""
    await ensure_topics(settings.kafka)
    gateway = Gateway(settings)
    await gateway.start()
    token = await TokenStore(gateway.store).create("shop", Role.PLATFORM)
    pump = TriagePump(settings, SCRIPT)
    await pump.start()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings, gateway), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    try:
        await pump.wait_assigned()
        while not server.started:
            await asyncio.sleep(0.02)
        yield f"http://127.0.0.1:{port}/v1", token
    finally:
        server.should_exit = True
        await task
        await pump.stop()
        await gateway.stop()


def test_the_openai_sdk_moderates_through_the_gateway(settings: Settings) -> None:
    async def scenario() -> None:
        async with serving(settings) as (base_url, token):
            def call(**kwargs):  # type: ignore[no-untyped-def]
                client = openai.OpenAI(base_url=base_url, api_key=token)
                try:
                    return client.moderations.create(**kwargs)
                finally:
                    client.close()

            answer = await asyncio.to_thread(call, model="omni-moderation-latest",
                                             input=["have a lovely day", "i will hurt you", "is this a threat?"])
            assert answer.id.startswith("modr-") and answer.model == "omni-moderation-latest"
            ok, bad, pending = answer.results
            assert ok.flagged is False and not any(ok.categories.model_dump().values())
            assert bad.flagged is True
            assert bad.categories.violence is True and bad.categories.violence_graphic is True
            assert bad.categories.hate is False and bad.categories.self_harm is False
            assert bad.category_scores.violence == pytest.approx(0.95)
            assert bad.category_scores.violence_graphic == pytest.approx(0.7)
            assert set(bad.categories.model_dump(by_alias=True)) == set(OPENAI_CATEGORIES)
            assert bad.category_applied_input_types.violence == ["text"]
            # Escalated and still hidden at the deadline: flagged (fail closed), no category yet.
            assert pending.flagged is True and not any(pending.categories.model_dump().values())
            extra = pending.model_extra["modpipe"]
            assert (extra["decision"], extra["final"], extra["timed_out"]) == ("hidden_pending", False, True)
            # A single string, asked again: the same item, answered from the store.
            again = await asyncio.to_thread(call, input="i will hurt you")
            assert again.results[0].flagged is True
            assert again.results[0].model_extra["modpipe"]["content_id"] == bad.model_extra["modpipe"]["content_id"]
            # The SDK's own error for a bad key.
            with pytest.raises(openai.AuthenticationError):
                await asyncio.to_thread(lambda: openai.OpenAI(base_url=base_url, api_key="mpr_wrong")
                                        .moderations.create(input="hi"))
            with pytest.raises(openai.UnprocessableEntityError):
                await asyncio.to_thread(call, input=[{"type": "image_url", "image_url": {"url": "http://x/y.png"}}])

    asyncio.run(scenario())
