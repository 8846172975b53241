"""The worker roles' handlers without Kafka, Redis or Triton: the in-memory store, a recording publisher, scripted
triage scores and the scripted reasoner (or the real reasoner over a scripted transport)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pipeline.codec import Record
from pipeline.config import PROJECT_ROOT, KafkaSettings, ReasonerSettings, TritonSettings
from pipeline.effects import Effects, RecordingPublisher
from pipeline.errors import ReasonerUnavailable, StoreUnavailable
from pipeline.handlers import ReasoningHandler, ReviewIntakeHandler, TriageHandler
from pipeline.policies import PolicyLibrary
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.reasoner.fakes import ScriptedTransport, answer
from pipeline.review.queue import InMemoryReviewInbox
from pipeline.schemas import (
    ContentItem,
    DeadLetter,
    Decision,
    Escalation,
    EscalationReason,
    ReviewReason,
    ReviewTask,
    Stage,
    TriageScores,
    Verdict,
    VerdictStatus,
)
from pipeline.store import EffectKind, InMemoryStore, Visibility, item_effect
from pipeline.triage.fakes import SCRIPTED_THRESHOLDS, ScriptedScorer

pytestmark = pytest.mark.unit

LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
KAFKA = KafkaSettings()
VERDICTS, ESCALATIONS, REVIEW, DEADLETTER = (
    KAFKA.verdicts_topic, KAFKA.escalations_topic, KAFKA.review_topic, KAFKA.deadletter_topic
)
QUIET = {"H": 0.01, "HR": 0.01, "S": 0.0, "S3": 0.0, "SH": 0.0}
SCRIPT = {
    "good morning everyone": (0.01, {**QUIET, "V": 0.01}),
    "i will hurt you": (0.95, {**QUIET, "V": 0.93}),
    "is this a threat?": (0.5, {**QUIET, "V": 0.45}),
}
FAST = TritonSettings(backoff_initial_s=0.001, backoff_max_s=0.002, request_timeout_s=2.0, max_attempts=2)


class Harness:
    """One role's handler over in-memory infrastructure, with helpers to read what it published."""

    def __init__(self) -> None:
        self.store = InMemoryStore()
        self.publisher = RecordingPublisher()
        self.effects = Effects(KAFKA, self.store, self.publisher)
        self.offset = 0

    def record(self, topic: str, value: bytes, key: bytes | None = None) -> Record:
        self.offset += 1
        return Record(topic, 0, self.offset, key, value, 1_700_000_000_000)

    def verdicts(self) -> list[Verdict]:
        return [Verdict.model_validate_json(v) for v in self.publisher.on(VERDICTS)]

    def dead_letters(self) -> list[DeadLetter]:
        return [DeadLetter.model_validate_json(v) for v in self.publisher.on(DEADLETTER)]


def triage(harness: Harness, *items: ContentItem | bytes, scorer: ScriptedScorer | None = None) -> list[Record]:
    scorer = scorer or ScriptedScorer(SCRIPTED_THRESHOLDS, SCRIPT)
    handler = TriageHandler(scorer, LIB, harness.effects, max_text_chars=1000)
    records = [harness.record(KAFKA.incoming_topic, i if isinstance(i, bytes) else i.to_bytes()) for i in items]
    asyncio.run(handler.handle_batch(records))
    return records


def item(cid: str, text: str) -> ContentItem:
    return ContentItem(content_id=cid, text=text)


# -- triage -----------------------------------------------------------------------------------------------------


def test_triage_decides_confident_items_at_once() -> None:
    h = Harness()
    triage(h, item("a", "good morning everyone"), item("b", "i will hurt you"))
    decided = {v.content_id: v for v in h.verdicts()}
    assert (decided["a"].status, decided["a"].decision) == (VerdictStatus.FINAL, Decision.ALLOW)
    assert (decided["b"].status, decided["b"].decision) == (VerdictStatus.FINAL, Decision.BLOCK)
    assert [p.policy_id for p in decided["b"].policies] == ["violence"]
    assert asyncio.run(h.store.visibility("b")).state is Visibility.REMOVED
    assert h.publisher.on(ESCALATIONS) == []


def test_triage_hides_before_it_escalates() -> None:
    h = Harness()
    triage(h, item("c", "is this a threat?"))
    topics = [topic for topic, _, _ in h.publisher.sent]
    assert topics == [VERDICTS, ESCALATIONS]  # the provisional hide is published first
    provisional = h.verdicts()[0]
    assert (provisional.status, provisional.decision) == (VerdictStatus.PROVISIONAL, Decision.HIDE_PENDING)
    assert asyncio.run(h.store.visibility("c")).state is Visibility.HIDDEN_PENDING
    escalation = Escalation.model_validate_json(h.publisher.on(ESCALATIONS)[0])
    assert escalation.reason is EscalationReason.AMBIGUOUS and escalation.policy_ids == ["violence"]


def test_triage_cites_the_version_that_enforces_after_a_swap() -> None:
    """A promotion swaps the library under a running worker (pipeline.lifecycle.live): later verdicts cite it."""
    h = Harness()
    handler = TriageHandler(ScriptedScorer(SCRIPTED_THRESHOLDS, SCRIPT), LIB, h.effects, max_text_chars=1000)
    violence = LIB.get("violence")
    promoted = dataclasses.replace(violence, version="cafe0123cafe0123", content_hash="cafe0123cafe0123")
    handler.use_library(PolicyLibrary({**{p.policy_id: p for p in LIB}, "violence": promoted}))
    asyncio.run(handler.handle_batch([h.record(KAFKA.incoming_topic, item("b", "i will hurt you").to_bytes())]))
    (verdict,) = h.verdicts()
    assert [(p.policy_id, p.version) for p in verdict.policies] == [("violence", "cafe0123cafe0123")]


def test_triage_redelivery_publishes_the_same_verdict_and_decides_nothing_new() -> None:
    h = Harness()
    first, again = item("a", "good morning everyone"), item("a", "good morning everyone")
    triage(h, first)
    triage(h, again, scorer=ScriptedScorer(SCRIPTED_THRESHOLDS, {"good morning everyone": (0.99, {"V": 0.99})}))
    verdicts = h.verdicts()
    assert len(verdicts) == 1 and verdicts[0].decision is Decision.ALLOW  # the redelivery published nothing new


def test_triage_finishes_an_interrupted_publish_on_redelivery() -> None:
    h = Harness()
    h.publisher.fail_with = ConnectionError("broker gone")
    with pytest.raises(ConnectionError):
        triage(h, item("a", "good morning everyone"))  # recorded in the ledger, never published
    assert asyncio.run(h.store.recorded(EffectKind.FINAL, item_effect("a", 1))) is not None
    h.publisher.fail_with = None
    triage(h, item("a", "good morning everyone"))
    assert [v.decision for v in h.verdicts()] == [Decision.ALLOW]
    assert asyncio.run(h.store.recorded(EffectKind.FINAL, item_effect("a", 1))).published


def test_triage_bad_input_is_dead_lettered_and_spares_its_batch_mates() -> None:
    h = Harness()
    triage(h, b'{"content_id": "x", "text": ', item("a", "good morning everyone"))
    (letter,) = h.dead_letters()
    assert letter.error_type == "SchemaError" and "not valid JSON" in letter.error and letter.stage == "triage"
    assert [v.content_id for v in h.verdicts()] == ["a"]


def test_triage_scoring_failure_dead_letters_the_batch_with_its_reason() -> None:
    h = Harness()
    broken = ScriptedScorer(SCRIPTED_THRESHOLDS, SCRIPT, fail_with=RuntimeError("boom"))
    triage(h, item("a", "good morning everyone"), scorer=broken)
    (letter,) = h.dead_letters()
    assert (letter.error_type, letter.error, letter.content_id) == ("RuntimeError", "boom", "a")


# -- reasoning --------------------------------------------------------------------------------------------------


def escalation_record(h: Harness, cid: str, text: str, policies: list[str]) -> Record:
    scores = TriageScores(model_version="t", violation=0.5, categories={"V": 0.5}, latency_ms=1.0)
    esc = Escalation(item=item(cid, text), triage=scores, reason=EscalationReason.AMBIGUOUS, policy_ids=policies,
                     ingested_at=ContentItem(content_id="t", text="t").created_at)
    return h.record(ESCALATIONS, esc.to_bytes())


def reason(h: Harness, transport: ScriptedTransport, *records: Record) -> None:
    reasoner = SafeguardReasoner(FAST, ReasonerSettings(), LIB, transport=transport)
    handler = ReasoningHandler(reasoner, LIB, h.effects)

    async def go() -> None:
        async with reasoner:
            for record in records:
                await handler.handle(record)

    asyncio.run(go())


def test_reasoning_publishes_the_models_confident_verdict() -> None:
    h = Harness()
    transport = ScriptedTransport(LIB, {("violence", "low"): [answer(1, ["VI1.a"], 0.9, "a threat")]})
    reason(h, transport, escalation_record(h, "c", "i will find you", ["violence"]))
    transport.assert_done()
    (verdict,) = h.verdicts()
    assert (verdict.stage, verdict.decision, verdict.rule_ids) == (Stage.REASONER, Decision.BLOCK, ["VI1.a"])
    assert asyncio.run(h.store.visibility("c")).state is Visibility.REMOVED


def test_reasoning_fails_closed_to_review_when_the_model_is_down() -> None:
    h = Harness()
    down = ReasonerUnavailable("connection refused")
    transport = ScriptedTransport(LIB, {("violence", "low"): [down, down]})
    reason(h, transport, escalation_record(h, "c", "i will find you", ["violence"]))
    transport.assert_done()
    assert h.verdicts() == []  # no final verdict: the item stays hidden
    (task,) = [ReviewTask.model_validate_json(v) for v in h.publisher.on(REVIEW)]
    assert task.reason is ReviewReason.REASONER_FAILED and task.reasoner_calls[0].error.startswith("ReasonerUnavailable")


def test_reasoning_redelivery_after_a_verdict_calls_no_model() -> None:
    h = Harness()
    transport = ScriptedTransport(LIB, {("violence", "low"): [answer(0, ["VI0.a"], 0.9, "news")]})
    record = escalation_record(h, "c", "the news reported an attack", ["violence"])
    reason(h, transport, record, record)  # the second delivery finds the verdict in the ledger
    assert transport.calls == [("violence", "low")]
    assert len(h.verdicts()) == 1


def test_reasoning_unknown_policy_is_a_dead_letter() -> None:
    h = Harness()
    reason(h, ScriptedTransport(LIB, {}), escalation_record(h, "c", "text", ["no_such_policy"]))
    (letter,) = h.dead_letters()
    assert letter.error_type == "PolicyError" and letter.content_id == "c"


# -- review intake ----------------------------------------------------------------------------------------------


def review_record(h: Harness, cid: str) -> Record:
    scores = TriageScores(model_version="t", violation=0.5, latency_ms=1.0)
    task = ReviewTask(task_id=f"task-{cid}", item=item(cid, "text"), triage=scores, reason=ReviewReason.EDGE_CASE,
                      policy_ids=["violence"], ingested_at=item(cid, "x").created_at)
    return h.record(REVIEW, task.to_bytes())


def intake(h: Harness, inbox: InMemoryReviewInbox, *records: Record) -> None:
    handler = ReviewIntakeHandler(h.store, inbox, h.effects)

    async def go() -> None:
        for record in records:
            await handler.handle(record)

    asyncio.run(go())


def test_review_intake_queues_a_task_once() -> None:
    h, inbox = Harness(), InMemoryReviewInbox({"violence": "high"})
    record = review_record(h, "r")
    intake(h, inbox, record, record)
    assert list(inbox.tasks) == ["r"] and inbox.tasks["r"][0] == "high:violence"


def test_review_intake_skips_an_item_decided_meanwhile() -> None:
    h, inbox = Harness(), InMemoryReviewInbox()
    final = Verdict.final("r", Decision.ALLOW, Stage.REASONER)
    asyncio.run(h.effects.verdict(final))
    intake(h, inbox, review_record(h, "r"))
    assert inbox.tasks == {}


def test_review_intake_bad_input_is_a_dead_letter() -> None:
    h = Harness()
    intake(h, InMemoryReviewInbox(), h.record(REVIEW, b"[1, 2]"))
    (letter,) = h.dead_letters()
    assert letter.stage == "review_intake" and "JSON object" in letter.error


def test_review_intake_rides_out_a_short_store_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    import pipeline.effects as effects_module

    monkeypatch.setattr(effects_module, "STORE_BACKOFF", effects_module.Backoff(0.001, 0.002))
    h, inbox = Harness(), InMemoryReviewInbox()
    calls = {"n": 0}
    real_enqueue = inbox.enqueue

    async def flaky(task: ReviewTask) -> bool:
        calls["n"] += 1
        if calls["n"] == 1:
            raise StoreUnavailable("redis restarting")
        return await real_enqueue(task)

    inbox.enqueue = flaky  # type: ignore[method-assign]
    intake(h, inbox, review_record(h, "r"))
    assert list(inbox.tasks) == ["r"] and h.dead_letters() == []
