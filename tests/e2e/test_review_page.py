"""The reviewer's page in a real headless Chromium: log in, claim, reveal, decide; the verdict arrives on Kafka;
revoking the token ends the page's session; guessing on the login page meets the rate limit.

A review task goes the real way: published to ``moderation.review``, queued by a ``review-intake`` worker process,
served by a ``modpipe review serve`` process. The browser is Debian's Chromium (``make install`` installs it),
driven by Playwright through its ``executable_path``; a machine without it fails this test, it does not skip.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pipeline.app import Role
from pipeline.config import KafkaSettings, RedisSettings, Settings
from pipeline.harness.workers import Workers
from pipeline.broker import Publisher, ensure_topics
from pipeline.review.auth import Role as AccessRole
from pipeline.review.auth import TokenStore
from pipeline.harness.review import read_topic, sample_task
from pipeline.schemas import Decision, Stage, Verdict, VerdictStatus
from pipeline.stack import free_port
from pipeline.store import RedisStore

pytestmark = pytest.mark.e2e

CHROMIUM = os.environ.get("MODPIPE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TEXT = "Those people are worthless by nature and I hate them."
ADMIN = "admin-bootstrap-token-for-the-page-test"


def _require_chromium() -> None:
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        pytest.fail(f"Chromium not found at {CHROMIUM}: run `make install` (apt-get install chromium)", pytrace=False)


def test_reviewer_logs_in_claims_and_removes_an_item(kafka_stack, unique_prefix, tmp_path) -> None:  # type: ignore[no-untyped-def]
    _require_chromium()
    from playwright.sync_api import expect, sync_playwright

    env = {**kafka_stack.env(), "MODPIPE_STATE_DIR": str(tmp_path), "MODPIPE_KAFKA__TOPIC_PREFIX": unique_prefix,
           "MODPIPE_REDIS__KEY_PREFIX": unique_prefix, "MODPIPE_KAFKA__PARTITIONS": "1",
           "MODPIPE_REVIEW__ADMIN_TOKEN": ADMIN}
    settings = Settings(
        state_dir=tmp_path,
        kafka=KafkaSettings(bootstrap_servers=kafka_stack.kafka_bootstrap, topic_prefix=unique_prefix, partitions=1,
                            session_timeout_s=2.0, heartbeat_interval_s=0.5),
        redis=RedisSettings(url=kafka_stack.redis_url, key_prefix=unique_prefix),
    )
    task = sample_task("page-1", text=TEXT, model_says=True, cited=("HT1.b",))

    async def prepare() -> str:
        await ensure_topics(settings.kafka)
        store = RedisStore(settings.redis)
        publisher = Publisher(settings.kafka)
        await publisher.start()
        try:
            token = await TokenStore(store).create("eve", AccessRole.REVIEWER)
            await publisher.send(settings.kafka.topic(settings.kafka.review_topic), "page-1", task.to_bytes())
        finally:
            await publisher.stop()
            await store.close()
        return token

    token = asyncio.run(prepare())
    workers = Workers(settings, env, tmp_path / "logs")
    port = free_port()
    log_path = tmp_path / "review-serve.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "review", "serve", "--host", "127.0.0.1", "--port", str(port)],
        env={**os.environ, **env}, stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        workers.start(Role.REVIEW_INTAKE)
        workers.wait_ready(timeout_s=120)
        deadline = time.monotonic() + 60
        while True:  # the service answers, and the intake worker has queued the task
            try:
                queues = httpx.get(f"{base}/v1/queues", headers={"Authorization": f"Bearer {token}"}, timeout=2).json()
                if queues["pending"] == 1:
                    break
            except httpx.HTTPError:
                pass
            assert server.poll() is None, log_path.read_text()[-2000:]
            assert time.monotonic() < deadline, "the task never reached the reviewers' queue"
            time.sleep(0.2)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(base + "/")
            expect(page).to_have_url(base + "/login")
            page.fill("#token", token)
            page.click("#login-button")
            expect(page.get_by_test_id("whoami")).to_have_text("eve (reviewer)")
            expect(page.get_by_test_id("queue-summary")).to_have_text("1 pending, 0 claimed")
            expect(page.locator("#queue-table tbody tr")).to_have_count(1)
            page.wait_for_selector("body[data-ready='1']")

            page.keyboard.press("n")  # claim next
            expect(page.get_by_test_id("item-id")).to_have_text("page-1")
            expect(page.get_by_test_id("content-text")).to_be_hidden()
            assert TEXT not in page.content(), "the content must stay hidden until revealed"
            expect(page.locator("mark.cited[data-rule='HT1.b']")).to_have_count(1)
            expect(page.locator(".badge.model")).to_have_text("model-generated")
            expect(page.get_by_test_id("model-calls")).to_contain_text("borderline wording")
            page.keyboard.press("r")  # reveal
            expect(page.get_by_test_id("content-text")).to_have_text(TEXT)
            page.screenshot(path=str(tmp_path / "item-view.png"), full_page=True)  # kept for a look after a failure
            page.select_option("#decision-policy", "hate")
            page.select_option("#decision-rule", "HT1.b")
            page.keyboard.press("x")  # remove
            expect(page.get_by_test_id("flash")).to_contain_text("Decided page-1: block")
            expect(page.get_by_test_id("queue-view")).to_be_visible()
            expect(page.get_by_test_id("queue-summary")).to_have_text("0 pending, 0 claimed")

            # Revoking the token ends the page's session: the next load goes back to the login page.
            revoked = httpx.delete(f"{base}/v1/tokens/eve", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=5)
            assert revoked.json() == {"principal_id": "eve", "revoked": 1}
            page.goto(base + "/")
            expect(page).to_have_url(base + "/login")
            # Guessing from the page meets the per-client login limit, and the page says so.
            for _ in range(11):
                page.fill("#token", "mpr_wrong")
                page.click("#login-button")
                expect(page.locator("#login-error")).to_be_visible()
            expect(page.locator("#login-error")).to_contain_text("Too many attempts")
            browser.close()

        kafka = settings.kafka
        values = asyncio.run(read_topic(kafka, kafka.topic(kafka.verdicts_topic),
                                        lambda vs: any(b'"page-1"' in v for v in vs)))
        verdicts = [Verdict.model_validate_json(v) for v in values]
        finals = [v for v in verdicts if v.content_id == "page-1" and v.status is VerdictStatus.FINAL]
        assert len(finals) == 1
        final = finals[0]
        assert final.stage is Stage.REVIEW and final.decision is Decision.BLOCK
        assert final.reviewer_id == "eve" and final.rule_ids == ["HT1.b"]
        admin = {"Authorization": f"Bearer {ADMIN}"}
        shown = httpx.get(f"{base}/v1/content/page-1", headers=admin, timeout=5).json()
        assert shown["state"] == "REMOVED" and shown["verdict"]["verdict_id"] == final.verdict_id
        assert TEXT not in log_path.read_text(), "content text must never reach the service log"
    finally:
        workers.stop_all()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
