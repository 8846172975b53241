"""``modpipe publish``, ``modpipe watch`` and ``modpipe webhooks ...`` as a user runs them, on a real broker and
Redis."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from aiokafka import AIOKafkaConsumer
from typer.testing import CliRunner

from pipeline.broker import Publisher, ensure_topics
from pipeline.cli import app as cli_app
from pipeline.cli.publish import stable_id
from pipeline.config import load_settings
from pipeline.gateway.api import create_app
from pipeline.review.auth import Role, TokenStore
from pipeline.schemas import ContentItem, Decision, Stage, Verdict
from pipeline.store.redis import RedisStore
from pipeline.webhooks.registry import WebhookRegistry
from tests.integration.test_gateway_openai import free_port

pytestmark = pytest.mark.integration


@pytest.fixture
def env(kafka_stack, unique_prefix, tmp_path, monkeypatch) -> dict[str, str]:  # type: ignore[no-untyped-def]
    values = {
        "MODPIPE_STATE_DIR": str(tmp_path),
        "MODPIPE_KAFKA__BOOTSTRAP_SERVERS": kafka_stack.kafka_bootstrap,
        "MODPIPE_KAFKA__TOPIC_PREFIX": unique_prefix,
        "MODPIPE_KAFKA__PARTITIONS": "2",
        "MODPIPE_REDIS__URL": kafka_stack.redis_url,
        "MODPIPE_REDIS__KEY_PREFIX": unique_prefix,
        "MODPIPE_WEBHOOKS__SIGNING_KEY": "cli-test-signing-key",
    }
    for key, value in values.items():
        monkeypatch.setenv(key, value)
    asyncio.run(ensure_topics(load_settings().kafka))
    return values


def incoming() -> list[ContentItem]:
    async def read() -> list[ContentItem]:
        kafka = load_settings().kafka
        consumer = AIOKafkaConsumer(kafka.topic(kafka.incoming_topic), bootstrap_servers=kafka.bootstrap_servers,
                                    group_id=None, auto_offset_reset="earliest", enable_auto_commit=False)
        await consumer.start()
        items: list[ContentItem] = []
        try:
            while batches := await consumer.getmany(timeout_ms=500):
                for messages in batches.values():
                    items += [ContentItem.model_validate_json(m.value) for m in messages]
        finally:
            await consumer.stop()
        return items

    return asyncio.run(read())


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli_app, list(args))
    return result.exit_code, result.output


def test_publish_json_lines_skips_what_would_be_dead_letters_and_summarises(  # type: ignore[no-untyped-def]
    env, tmp_path: Path
) -> None:
    lines = [
        {"content_id": "j-1", "text": "good morning everyone", "author_id": "u1", "colour": "ignored"},
        {"content_id": "j-2", "text": "see you at the market", "language": "en"},
        {"text": "no id here"},  # a stable id from the text
        {"content_id": "j-3"},  # no text
        {"content_id": "bad id!", "text": "x"},  # invalid id
        {"content_id": "j-1", "text": "good morning everyone"},  # duplicate
        {"content_id": "j-2", "text": "an edit in the file"},  # the same id with another text
        {"content_id": "j-4", "text": "y" * 20_001},  # over the limit
    ]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n\n" + '{"content_id": "j-5", "text": '
                    '"\\ud800"}\n')
    code, output = run("publish", str(path), "--no-progress", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert (report["read"], report["published"], report["duplicates"], report["skipped"]) == (10, 3, 1, 6)
    assert report["skipped_by_reason"] == {
        "no text in 'text'": 1, "invalid id in 'content_id'": 1, "id repeated with another text": 1,
        "text over 20000 characters": 1, "not a JSON object": 1, "text is not valid Unicode (a lone surrogate)": 1}
    items = incoming()
    assert sorted(i.content_id for i in items) == sorted(["j-1", "j-2", stable_id("no id here")])
    assert next(i for i in items if i.content_id == "j-1").author_id == "u1"
    assert "good morning" not in output  # the summary never shows content
    # The same file again publishes the same items (the pipeline sees redeliveries, not new items).
    run("publish", str(path), "--no-progress", "--json")
    assert sorted({i.content_id for i in incoming()}) == sorted(["j-1", "j-2", stable_id("no id here")])


def test_publish_csv_with_a_text_column_an_id_column_a_platform_and_a_rate(  # type: ignore[no-untyped-def]
    env, tmp_path: Path
) -> None:
    path = tmp_path / "posts.csv"
    rows = ["id,body,lang"] + [f"c-{i},post number {i},en" for i in range(10)]
    path.write_text("\n".join(rows) + "\n")
    code, output = run("publish", str(path), "--text-column", "body", "--id-column", "id", "--platform", "shop",
                       "--rate", "20", "--no-progress", "--json")
    assert code == 0, output
    report = json.loads(output)
    assert report["published"] == 10 and report["skipped"] == 0
    assert report["elapsed_s"] >= 9 / 20 * 0.9  # paced: ten items at 20/s take at least ~0.45 s
    items = incoming()
    assert {i.platform for i in items} == {"shop"} and len(items) == 10
    code, output = run("publish", str(path), "--text-column", "missing", "--no-progress")
    assert code == 1 and "no 'missing' column" in output


def test_publish_through_the_gateway(env, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    config = load_settings()

    async def token() -> str:
        store = RedisStore(config.redis)
        try:
            return await TokenStore(store).create("shop", Role.PLATFORM)
        finally:
            await store.close()

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        monkeypatch.setenv("MODPIPE_GATEWAY__URL", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("MODPIPE_GATEWAY__TOKEN", asyncio.run(token()))
        path = tmp_path / "items.jsonl"
        path.write_text("\n".join(json.dumps({"content_id": f"g-{i}", "text": f"hello {i}"}) for i in range(5)))
        code, output = run("publish", str(path), "--gateway", "--no-progress", "--json")
        assert code == 0, output
        assert json.loads(output)["published"] == 5
        items = incoming()
        assert sorted(i.content_id for i in items) == [f"g-{i}" for i in range(5)]
        assert {i.platform for i in items} == {"shop"}
        # Again: the gateway says duplicate, nothing is published twice.
        code, output = run("publish", str(path), "--gateway", "--no-progress", "--json")
        assert json.loads(output)["published"] == 0 and len(incoming()) == 5
    finally:
        server.should_exit = True
        thread.join(10)


def test_watch_prints_one_readable_line_per_verdict(env) -> None:  # type: ignore[no-untyped-def]
    config = load_settings()
    first = Verdict.final("w-1", Decision.BLOCK, Stage.TRIAGE, platform="shop", rationale="triage classifier")
    others = [Verdict.provisional("w-2", Stage.TRIAGE, platform="shop"),
              Verdict.final("w-3", Decision.ALLOW, Stage.TRIAGE, platform="forum")]

    async def publish() -> None:
        publisher = Publisher(config.kafka)
        await publisher.start()
        try:
            for v in (first, *others):
                await publisher.send(config.kafka.topic(config.kafka.verdicts_topic), v.content_id, v.to_bytes())
        finally:
            await publisher.stop()

    asyncio.run(publish())
    code, output = run("watch", "--from-beginning", "--platform", "shop", "--count", "2", "--idle-exit", "5")
    assert code == 0, output
    lines = output.strip().splitlines()
    assert len(lines) == 2
    assert "final" in lines[0] and "block" in lines[0] and "w-1 r1" in lines[0] and "[shop]" in lines[0]
    assert "provisional" in lines[1] and "w-2" in lines[1]
    code, output = run("watch", "--from-beginning", "--final-only", "--json", "--count", "2", "--idle-exit", "5")
    assert [json.loads(line)["content_id"] for line in output.strip().splitlines()] == ["w-1", "w-3"]


def test_webhooks_add_list_remove_and_replay(env) -> None:  # type: ignore[no-untyped-def]
    code, output = run("webhooks", "add", "shop", "http://127.0.0.1:9/hook")
    assert code == 0, output
    assert "whsec_" in output and "not https" in output
    code, output = run("webhooks", "list")
    assert code == 0 and "shop" in output and "http://127.0.0.1:9/hook" in output
    code, output = run("webhooks", "add", "shop", "ftp://example.org/x")
    assert code == 1 and "url" in output
    code, output = run("webhooks", "replay", "shop")
    assert code == 0 and "delivered 0, 0 still dead-lettered" in output
    code, output = run("webhooks", "remove", "shop")
    assert code == 0
    assert run("webhooks", "remove", "shop")[0] == 1
    assert run("webhooks", "replay", "shop")[0] == 1

    async def stored() -> dict:
        store = RedisStore(load_settings().redis)
        try:
            return await WebhookRegistry(store, 60).all()
        finally:
            await store.close()

    assert asyncio.run(stored()) == {}
