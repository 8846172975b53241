"""The gateway's and the webhooks' pure parts: the OpenAI mapping, reading a decision, the lag, signatures, offsets."""

from __future__ import annotations

import asyncio
import random

import pytest

from pipeline.config import GatewaySettings, KafkaSettings, Settings, WebhookSettings
from pipeline.errors import BrokerUnavailable, StoreUnavailable
from pipeline.gateway.backpressure import TriageLag, triage_group
from pipeline.gateway.models import SubmitItem
from pipeline.gateway.moderations import OPENAI_CATEGORIES, moderation_content_id, result
from pipeline.gateway.waiting import Current
from pipeline.schemas import (
    CONTENT_ID_PATTERN,
    Decision,
    Effort,
    PolicyRef,
    ReasonerCall,
    Stage,
    TriageScores,
    Verdict,
)
from pipeline.store.base import Visibility, VisibilityRecord, visibility_for
from pipeline.webhooks.registry import InvalidWebhook, check_url, delivery_id, derive_secret
from pipeline.webhooks.deliverer import Offsets, delivery_for
from pipeline.webhooks.sender import Attempt, Sender
from pipeline.webhooks.signing import sign, verify

pytestmark = pytest.mark.unit

SCORES = TriageScores(model_version="m", violation=0.97, categories={"V": 0.95, "V2": 0.7, "H": 0.02, "H2": 0.01},
                      latency_ms=1.0)


def ref(pid: str) -> PolicyRef:
    return PolicyRef(policy_id=pid, version="1", content_hash="abc")


def state_of(verdict: Verdict | None, judged: int | None = 1):  # type: ignore[no-untyped-def]
    record = VisibilityRecord(visibility_for(verdict) if verdict else Visibility.UNKNOWN, verdict,
                              bool(verdict and verdict.status.value == "final"))
    return Current(verdict.content_id if verdict else "x", judged, record).state()


# -- reading a decision ---------------------------------------------------------------------------------------


def test_an_unjudged_text_is_received_and_hidden_pending_even_if_an_older_revision_was_allowed() -> None:
    allowed = Verdict.final("x", Decision.ALLOW, Stage.TRIAGE, revision=1)
    assert state_of(allowed, judged=2).model_dump(include={"decision", "state", "final"}) == {
        "decision": "hidden_pending", "state": "received", "final": False}
    assert state_of(None, judged=None).state == "received"


def test_decisions_follow_the_verdict_of_the_judged_revision() -> None:
    assert state_of(Verdict.final("x", Decision.ALLOW, Stage.TRIAGE)).decision == "allow"
    blocked = state_of(Verdict.final("x", Decision.BLOCK, Stage.REASONER))
    assert (blocked.decision, blocked.state, blocked.final) == ("block", "removed", True)
    pending = state_of(Verdict.provisional("x", Stage.TRIAGE))
    assert (pending.decision, pending.state, pending.final) == ("hidden_pending", "hidden_pending", False)
    assert pending.verdict is not None


# -- OpenAI's shape -----------------------------------------------------------------------------------------


def test_a_triage_block_flags_its_policies_categories_and_sub_categories_by_score() -> None:
    verdict = Verdict.final("x", Decision.BLOCK, Stage.TRIAGE, triage=SCORES, policies=[ref("violence")])
    out = result(state_of(verdict), timed_out=False)
    assert out.flagged and set(out.categories) == set(OPENAI_CATEGORIES) == set(out.category_scores)
    assert [c for c, v in out.categories.items() if v] == ["violence", "violence/graphic"]
    assert out.category_scores["violence"] == 0.95 and out.category_scores["hate"] == 0.02
    assert out.category_scores["illicit"] == 0.0  # no triage head: never scored
    assert out.modpipe.decision == "block" and out.modpipe.verdict_id == verdict.verdict_id


def test_a_reasoner_block_flags_the_policies_whose_last_answer_was_a_violation() -> None:
    def call(pid: str, violation: bool, effort: Effort) -> ReasonerCall:
        return ReasonerCall(policy=ref(pid), model="m", effort=effort, violation=violation, latency_ms=1.0)

    verdict = Verdict.final("x", Decision.BLOCK, Stage.REASONER, triage=SCORES,
                            policies=[ref("hate"), ref("harassment")],
                            reasoner_calls=[call("hate", False, Effort.LOW), call("hate", True, Effort.HIGH),
                                            call("harassment", False, Effort.LOW)])
    flagged = [c for c, v in result(state_of(verdict), False).categories.items() if v]
    assert flagged == ["hate"]  # H2 is low: hate/threatening stays false


def test_hidden_pending_is_flagged_with_no_category_and_allow_is_not_flagged() -> None:
    pending = result(state_of(Verdict.provisional("x", Stage.TRIAGE, triage=SCORES)), timed_out=True)
    assert pending.flagged and not any(pending.categories.values())
    assert (pending.modpipe.decision, pending.modpipe.timed_out) == ("hidden_pending", True)
    assert pending.category_scores["violence"] == 0.95  # triage's scores are known already
    allowed = result(state_of(Verdict.final("x", Decision.ALLOW, Stage.TRIAGE, triage=SCORES)), False)
    assert not allowed.flagged and not any(allowed.categories.values())
    unknown_policy = Verdict.final("x", Decision.BLOCK, Stage.REVIEW, policies=[ref("house_rules")])
    out = result(state_of(unknown_policy), False)
    assert out.flagged and not any(out.categories.values())


def test_moderation_ids_are_stable_per_platform_and_text() -> None:
    import re

    a = moderation_content_id("shop", "Hello  world")
    assert a == moderation_content_id("shop", "Hello world")  # the normalised text
    assert a != moderation_content_id("forum", "Hello world")
    assert re.fullmatch(CONTENT_ID_PATTERN, a)


def test_a_submitted_item_takes_the_tokens_platform() -> None:
    item = SubmitItem(content_id="a", text="t", edit=True)
    wire = item.content_item("shop")
    assert wire.platform == "shop" and "edit" not in wire.model_dump()


# -- the triage lag ----------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lag_reader(record: dict | Exception | None, broker: list | Exception, clock: FakeClock,  # type: ignore[no-untyped-def]
               bound: int = 10):
    calls = {"record": 0, "broker": 0}

    async def lag_record(store, role):  # type: ignore[no-untyped-def]
        calls["record"] += 1
        assert role == "triage"
        if isinstance(record, Exception):
            raise record
        return record

    async def broker_lag(kafka, group, topic, timeout_s):  # type: ignore[no-untyped-def]
        calls["broker"] += 1
        assert (group, topic) == ("p.modpipe-triage", "p.content.incoming")
        if isinstance(broker, Exception):
            raise broker
        return broker

    settings = Settings(kafka=KafkaSettings(topic_prefix="p."),
                        gateway=GatewaySettings(max_triage_lag=bound, lag_refresh_s=2.0))
    lag = TriageLag(settings, None, clock=clock, broker_lag=broker_lag, lag_record=lag_record)  # type: ignore[arg-type]
    return lag, calls


class _Lag:
    def __init__(self, lag: int) -> None:
        self.lag = lag


def test_lag_comes_from_the_workers_record_and_is_read_once_per_refresh() -> None:
    clock = FakeClock()
    lag, calls = lag_reader({"lag": 11, "bound": None}, [], clock)
    over = asyncio.run(lag.over_bound())
    assert over is not None and (over.lag, over.source) == (11, "workers")
    asyncio.run(lag.over_bound())
    assert calls == {"record": 1, "broker": 0}
    clock.now += 2.5
    asyncio.run(lag.over_bound())
    assert calls["record"] == 2


def test_without_a_worker_record_the_broker_is_asked_and_an_unknown_lag_is_not_over() -> None:
    clock = FakeClock()
    lag, calls = lag_reader(None, [_Lag(4), _Lag(3)], clock, bound=10)
    reading = asyncio.run(lag.reading())
    assert (reading.lag, reading.source) == (7, "broker") and asyncio.run(lag.over_bound()) is None
    down, _ = lag_reader(StoreUnavailable("redis"), BrokerUnavailable("broker"), FakeClock())
    assert asyncio.run(down.reading()).source == "unknown" and asyncio.run(down.over_bound()) is None


def test_the_gateway_names_the_triage_group_as_the_workers_do() -> None:
    from pipeline.app import Role, group_id

    settings = Settings(kafka=KafkaSettings(topic_prefix="t1."))
    assert triage_group(settings) == group_id(settings, Role.TRIAGE)


# -- webhooks ------------------------------------------------------------------------------------------------


def test_signatures_verify_only_the_same_body_secret_and_recent_time() -> None:
    body = b'{"a": 1}'
    header = sign("whsec_x", body, timestamp=1_000_000)
    assert verify("whsec_x", header, body, now=1_000_100)
    assert not verify("whsec_x", header, body + b" ", now=1_000_100)
    assert not verify("whsec_y", header, body, now=1_000_100)
    assert not verify("whsec_x", header, body, now=1_000_000 + 301)  # replayed later
    assert not verify("whsec_x", None, body) and not verify("whsec_x", "v1=abc", body)


def test_secrets_are_derived_per_registration_and_urls_are_checked() -> None:
    one = derive_secret("key", "shop", "r1")
    assert one.startswith("whsec_") and one == derive_secret("key", "shop", "r1")
    assert one != derive_secret("key", "shop", "r2") != derive_secret("other", "shop", "r1")
    assert one != derive_secret("key", "shop2", "r1")
    for bad in ("ftp://x/y", "https://", "https://user:pw@host/x", "not a url"):
        with pytest.raises(InvalidWebhook):
            check_url(bad)
    assert check_url("https://hooks.example.org/modpipe?x=1")


def test_deliveries_keep_their_id_and_say_whether_they_supersede() -> None:
    first = Verdict.final("a", Decision.ALLOW, Stage.TRIAGE, platform="shop")
    second = Verdict.final("a", Decision.BLOCK, Stage.REVIEW, platform="shop", supersedes=first.verdict_id, revision=2)
    d1, d2 = delivery_for(first), delivery_for(second)
    assert (d1.event.value, d2.event.value) == ("verdict.final", "verdict.superseding")
    assert d1.delivery_id == delivery_id("shop", first.verdict_id) == delivery_for(first).delivery_id
    assert d2.supersedes == first.verdict_id and d2.revision == 2


def test_offsets_commit_only_up_to_the_first_unfinished_message() -> None:
    from aiokafka import TopicPartition

    tp = TopicPartition("t", 0)
    offsets = Offsets()
    assert offsets.committable(tp) is None
    for o in (5, 6, 7):
        offsets.take(tp, o)
    offsets.finish(tp, 6)
    assert offsets.committable(tp) == 5
    offsets.finish(tp, 5)
    assert offsets.committable(tp) == 7
    offsets.finish(tp, 7)
    assert offsets.committable(tp) == 8


def test_backoff_doubles_with_jitter_up_to_the_maximum_and_honours_retry_after() -> None:
    sender = Sender(WebhookSettings(backoff_initial_s=1.0, backoff_max_s=10.0), rng=random.Random(1))
    delays = [sender.delay(n) for n in range(1, 7)]
    assert 0.8 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and all(d <= 10.0 for d in delays)
    assert delays[-1] >= 8.0
    told = Attempt(False, "http_error", 429, "busy", retry_after_s=7.0)
    assert sender.delay(1, told) == 7.0
    assert sender.delay(1, Attempt(False, "http_error", 503, "x", retry_after_s=3600)) == 10.0
    asyncio.run(sender.close())


# -- the OpenAPI document ---------------------------------------------------------------------------------------


def test_every_route_is_in_the_openapi_document_with_its_bodies_and_bearer_auth() -> None:
    import httpx

    from pipeline.gateway.api import create_app

    app = create_app(Settings())  # not started (ASGITransport runs no lifespan): the document needs no services

    async def fetch() -> dict:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gateway") as http:
            answer = await http.get("/openapi.json")
            assert answer.status_code == 200
            return answer.json()

    doc = asyncio.run(fetch())
    routes = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert routes == {("POST", "/v1/items"), ("GET", "/v1/items/{content_id}"), ("POST", "/v1/moderate"),
                      ("POST", "/v1/moderations")}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            assert op["security"] == [{"HTTPBearer": []}], path
            assert {"401", "422", "429", "503"} <= set(op["responses"]), path
    schemas = doc["components"]["schemas"]
    assert {"SubmitItem", "ItemBatch", "ModerationRequest", "ModerationResponse", "Verdict", "ErrorAnswer"} <= set(
        schemas)
    assert "edit" in schemas["SubmitItem"]["properties"]
    body = doc["paths"]["/v1/items"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"oneOf": [{"$ref": "#/components/schemas/SubmitItem"}, {"$ref": "#/components/schemas/ItemBatch"}]}
    for ref in _refs(doc):
        assert ref.split("/")[-1] in schemas, ref  # every reference resolves


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []
