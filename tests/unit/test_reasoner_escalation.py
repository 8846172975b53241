"""Effort escalation, answer checks, aggregation by severity, the verdict cache and the circuit breaker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from pipeline.config import PROJECT_ROOT, ReasonerSettings, TritonSettings
from pipeline.errors import ReasonerUnavailable
from pipeline.reasoner.harmony import render_completion
from pipeline.policies import PolicyLibrary
from pipeline.reasoner.breaker import CircuitBreaker
from pipeline.reasoner.core import SafeguardReasoner, _cap
from pipeline.reasoner.cache import InMemoryVerdictCache, cache_key
from pipeline.texts import normalise_text
from pipeline.reasoner.fakes import ScriptedTransport, answer
from pipeline.router import ReasoningRoute
from pipeline.schemas import ContentItem, Effort, ReviewReason, TriageScores

pytestmark = pytest.mark.unit
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
FAST = TritonSettings(backoff_initial_s=0.001, backoff_max_s=0.004, request_timeout_s=2.0, max_attempts=3)
ITEM = ContentItem(content_id="c1", text="some post")


def triage(score: float) -> TriageScores:
    return TriageScores(model_version="t", violation=score, categories={}, latency_ms=1.0)


def make(script: dict, *, cache=None, breaker=None, settings: ReasonerSettings | None = None,
         triton: TritonSettings = FAST) -> tuple[SafeguardReasoner, ScriptedTransport]:
    transport = ScriptedTransport(LIB, script)
    reasoner = SafeguardReasoner(triton, settings or ReasonerSettings(min_confidence=0.6), LIB,
                                 transport=transport, cache=cache, breaker=breaker)
    return reasoner, transport


def judge(reasoner: SafeguardReasoner, item: ContentItem, policies: list[str], tri: TriageScores | None = None):
    return asyncio.run(reasoner.judge(item, policies, triage=tri))


def test_high_risk_policy_is_always_checked_at_high_effort() -> None:
    script = {("self_harm", "low"): [answer(0, ["SH0.a"], 0.95)], ("self_harm", "high"): [answer(0, ["SH0.a"], 0.9)]}
    reasoner, t = make(script)
    outcome = judge(reasoner, ITEM, ["self_harm"])
    t.assert_done()
    assert outcome.route is ReasoningRoute.ALLOW
    assert outcome.efforts_used == [Effort.LOW, Effort.HIGH] and outcome.effort is Effort.HIGH
    assert outcome.calls[0].escalation_reasons == ["high_risk_policy"] and outcome.calls[1].escalation_reasons == []


@pytest.mark.parametrize(
    ("final", "reason"),
    [
        ("1", "invalid_output"),  # a bare label is not the schema the policy asks for
        ('{"violation": 1, "rule_ids": ["VI1.a"], "confidence": 0.9, "rationale": "x"}', "invalid_output"),
        ('{"violation": 1, "policy_category": "VI1.a", "rule_ids": ["VI1.a"], "confidence": 0.9, "rationale": "x", '
         '"extra": 1}', "invalid_output"),
        ('{"violation": 1, "policy_category": "VI0.a", "rule_ids": ["VI0.a"], "confidence": 0.9, "rationale": "x"}',
         "rules_disagree"),  # "violation" citing only a SAFE rule
        ('{"violation": 0, "policy_category": "VI1.a", "rule_ids": ["VI1.a"], "confidence": 0.9, "rationale": "x"}',
         "rules_disagree"),
        ('{"violation": 1, "policy_category": "VI7.q", "rule_ids": ["VI7.q"], "confidence": 0.9, "rationale": "x"}',
         "unknown_rules"),
    ],
)
def test_untrustworthy_answers_are_asked_again_then_reviewed(final: str, reason: str) -> None:
    script = {("violence", "low"): [render_completion("a", final)], ("violence", "high"): [render_completion("b", final)]}
    reasoner, t = make(script)
    outcome = judge(reasoner, ITEM, ["violence"])
    t.assert_done()
    assert reason in outcome.calls[0].escalation_reasons and reason in outcome.calls[1].escalation_reasons
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.EDGE_CASE
    assert outcome.rule_ids == [] or all(r in LIB.get("violence").rule_ids for r in outcome.rule_ids)


def test_answer_contradicting_a_confident_triage_score_gets_a_second_look() -> None:
    script = {("hate", "low"): [answer(0, ["HT0.b"], 0.9)], ("hate", "high"): [answer(1, ["HT1.a"], 0.85, "dehum")]}
    reasoner, t = make(script)
    outcome = judge(reasoner, ITEM, ["hate"], triage(0.97))
    t.assert_done()
    assert outcome.calls[0].escalation_reasons == ["contradicts_triage"]
    assert outcome.route is ReasoningRoute.BLOCK and outcome.rule_ids == ["HT1.a"]


def test_high_effort_answer_that_still_disagrees_with_triage_is_accepted() -> None:
    # contradicting triage asks for a second look; the considered answer then stands (triage is the cheap judge)
    script = {("hate", "low"): [answer(0, ["HT0.a"], 0.9)], ("hate", "high"): [answer(0, ["HT0.a"], 0.9)]}
    reasoner, _ = make(script)
    outcome = judge(reasoner, ITEM, ["hate"], triage(0.97))
    assert outcome.route is ReasoningRoute.ALLOW
    assert outcome.calls[1].escalation_reasons == ["contradicts_triage"]


def test_no_triage_contradiction_in_the_ambiguous_band() -> None:
    reasoner, t = make({("hate", "low"): [answer(0, ["HT0.b"], 0.9)]})
    outcome = judge(reasoner, ITEM, ["hate"], triage(0.5))
    t.assert_done()
    assert outcome.route is ReasoningRoute.ALLOW and len(outcome.calls) == 1


def test_policies_are_judged_in_parallel_and_aggregated_by_severity() -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    class Parallel(ScriptedTransport):
        async def generate(self, prompt: str, request_id: str, sampling: dict | None = None) -> str:
            seen.append(request_id)
            if len(seen) == 2:
                gate.set()
            await asyncio.wait_for(gate.wait(), 1.0)  # deadlocks (times out) unless both calls are in flight
            return await super().generate(prompt, request_id)

    script = {("harassment", "low"): [answer(1, ["HR1.a"], 0.9, "insult")],
              ("violence", "low"): [answer(1, ["VI1.a"], 0.9, "threat")]}
    transport = Parallel(LIB, script)
    reasoner = SafeguardReasoner(FAST, ReasonerSettings(), LIB, transport=transport)
    outcome = asyncio.run(reasoner.judge(ITEM, ["harassment", "violence"]))
    transport.assert_done()
    assert outcome.route is ReasoningRoute.BLOCK
    assert outcome.deciding_policy == "violence"  # severity high beats medium
    assert outcome.rule_ids == ["VI1.a", "HR1.a"] and outcome.rationale.startswith("[violence ")


def test_escalate_to_humans_takes_precedence_over_removal() -> None:
    script = {("violence", "low"): [answer(1, ["VI1.a"], 0.95)],
              ("sexual_minors", "low"): [answer(1, ["SM1.a"], 0.95)],
              ("sexual_minors", "high"): [answer(1, ["SM1.a"], 0.95)]}
    reasoner, t = make(script)
    outcome = judge(reasoner, ITEM, ["violence", "sexual_minors"])
    t.assert_done()
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.POLICY_ESCALATE
    assert outcome.deciding_policy == "sexual_minors" and outcome.rule_ids[0] == "SM1.a"


def test_chain_of_thought_is_kept_capped_and_never_in_the_rationale() -> None:
    cot = "step " * 2000
    script = {("violence", "low"): [answer(0, ["VI0.a"], 0.9, "idiom", analysis=cot)]}
    reasoner, _ = make(script, settings=ReasonerSettings(analysis_max_chars=300))
    outcome = judge(reasoner, ITEM, ["violence"])
    call = outcome.calls[0]
    assert 0 < len(call.analysis) <= 300 and "characters cut" in call.analysis and call.analysis.startswith("step")
    assert "step step" not in outcome.rationale and "idiom" in outcome.rationale
    assert _cap("short", 300) == "short"


def test_default_policies_exclude_on_request_ones() -> None:
    script = {(p, "low"): [answer(0, [], 0.9)] for p in LIB.default_ids()}
    script.update({(p, "high"): [answer(0, [], 0.9)] for p in LIB.default_ids() if LIB.get(p).high_risk})
    reasoner, t = make(script)
    judge(reasoner, ITEM, [])
    t.assert_done()
    assert "fraud_spam" not in {p for p, _ in t.calls}


def test_repeated_text_makes_no_second_model_call() -> None:
    cache = InMemoryVerdictCache()
    reasoner, t = make({("violence", "low"): [answer(1, ["VI1.a"], 0.9)]}, cache=cache)
    first = judge(reasoner, ContentItem(content_id="a", text="I will  hurt you"), ["violence"])
    again = judge(reasoner, ContentItem(content_id="b", text=" I will hurt you\n"), ["violence"])  # same, normalised
    t.assert_done()
    assert len(t.calls) == 1
    assert not first.calls[0].cached and again.calls[0].cached
    assert again.route is first.route is ReasoningRoute.BLOCK and again.rule_ids == ["VI1.a"]


def test_identical_calls_in_flight_are_collapsed() -> None:
    cache = InMemoryVerdictCache()

    class Slow(ScriptedTransport):
        async def generate(self, prompt: str, request_id: str, sampling: dict | None = None) -> str:
            await asyncio.sleep(0.05)
            return await super().generate(prompt, request_id)

    transport = Slow(LIB, {("violence", "low"): [answer(0, ["VI0.a"], 0.9)]})
    reasoner = SafeguardReasoner(FAST, ReasonerSettings(), LIB, transport=transport, cache=cache)

    async def go():  # type: ignore[no-untyped-def]
        items = [ContentItem(content_id=f"d{i}", text="same text") for i in range(5)]
        return await asyncio.gather(*(reasoner.judge(i, ["violence"]) for i in items))

    outcomes = asyncio.run(go())
    transport.assert_done()
    assert len(transport.calls) == 1 and sum(o.calls[0].cached for o in outcomes) == 4


def test_cache_key_names_text_hash_policy_version_effort_and_model() -> None:
    version = LIB.get("violence").version
    key = cache_key("Hi  there", version, Effort.LOW, "m")
    assert key == cache_key("Hi there", version, Effort.LOW, "m")
    assert key != cache_key("hi there", version, Effort.LOW, "m")  # case is kept
    assert key != cache_key("Hi there", version, Effort.HIGH, "m") != cache_key("Hi there", "other", Effort.LOW, "m")
    assert version in key and "Hi" not in key
    assert normalise_text("a\u200b b\t\n c") == "a b c"


def test_errors_are_not_cached_and_a_broken_cache_is_only_a_miss() -> None:
    class Broken(InMemoryVerdictCache):
        async def get(self, key: str):  # type: ignore[no-untyped-def]
            raise ConnectionError("redis down")

    cache = InMemoryVerdictCache()
    script = {("violence", "low"): [ReasonerUnavailable("down")] * 3 + [answer(0, ["VI0.a"], 0.9)]}
    reasoner, _ = make(script, cache=cache)
    assert judge(reasoner, ITEM, ["violence"]).route is ReasoningRoute.REVIEW
    assert cache.puts == 0
    assert judge(reasoner, ITEM, ["violence"]).route is ReasoningRoute.ALLOW and cache.puts == 1
    reasoner, t = make({("violence", "low"): [answer(0, ["VI0.a"], 0.9)]}, cache=Broken())
    assert judge(reasoner, ITEM, ["violence"]).route is ReasoningRoute.ALLOW
    t.assert_done()


def test_circuit_breaker_fails_fast_then_lets_one_trial_through() -> None:
    now = [0.0]
    breaker = CircuitBreaker(failures=2, reset_s=10, clock=lambda: now[0])
    triton = TritonSettings(max_attempts=1, backoff_initial_s=0.001, request_timeout_s=2.0)
    script: dict[tuple[str, str], list[Any]] = {
        ("violence", "low"): [ReasonerUnavailable("down"), ReasonerUnavailable("down"), answer(0, ["VI0.a"], 0.9)]
    }
    reasoner, t = make(script, breaker=breaker, triton=triton)
    items = [ContentItem(content_id=f"b{i}", text=f"post {i}") for i in range(4)]
    for item in items[:2]:
        assert judge(reasoner, item, ["violence"]).review_reason is ReviewReason.REASONER_FAILED
    assert breaker.state == "open"
    fast = judge(reasoner, items[2], ["violence"])  # no model call at all: fail closed at once
    assert len(t.calls) == 2 and "circuit breaker open" in (fast.calls[0].error or "")
    assert fast.route is ReasoningRoute.REVIEW and fast.review_reason is ReviewReason.REASONER_FAILED
    now[0] = 11.0
    assert breaker.state == "half_open"
    assert judge(reasoner, items[3], ["violence"]).route is ReasoningRoute.ALLOW
    assert breaker.state == "closed"
    t.assert_done()


def test_strict_answer_from_the_fake_has_no_output_errors() -> None:
    final = json.loads(answer(1, ["VI1.a"], 0.9).split("final<|message|>")[1].split("<|return|>")[0])
    assert set(final) == {"violation", "policy_category", "rule_ids", "confidence", "rationale"}
    reasoner, _ = make({("violence", "low"): [answer(1, ["VI1.a"], 0.9)]})
    outcome = judge(reasoner, ITEM, ["violence"])
    assert outcome.calls[0].output_errors == [] and outcome.calls[0].policy_category == "VI1.a"
