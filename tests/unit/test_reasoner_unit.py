"""The reasoner's escalation, retries, parsing and routing, driven by a scripted transport (no server)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pipeline.config import PROJECT_ROOT, ReasonerSettings, TritonSettings
from pipeline.errors import PolicyError, ReasonerUnavailable
from pipeline.reasoner.harmony import render_completion
from pipeline.policies import PolicyLibrary
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.reasoner.fakes import ScriptedReasoner, ScriptedTransport, UnscriptedCall, answer
from pipeline.router import ReasoningRoute
from pipeline.schemas import ContentItem, Effort, ReviewReason

pytestmark = pytest.mark.unit
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
FAST = TritonSettings(backoff_initial_s=0.001, backoff_max_s=0.004, request_timeout_s=2.0, max_attempts=3)
ITEM = ContentItem(content_id="c1", text="some post")


def run(script: dict[tuple[str, str], list[Any]], policies: list[str], triton: TritonSettings = FAST):
    transport = ScriptedTransport(LIB, script)
    reasoner = SafeguardReasoner(triton, ReasonerSettings(min_confidence=0.6), LIB, transport=transport)

    async def go():  # type: ignore[no-untyped-def]
        async with reasoner:
            return await reasoner.judge(ITEM, policies)

    outcome = asyncio.run(go())
    assert transport.started and transport.closed
    return outcome, transport


def test_confident_violation_blocks_at_first_effort() -> None:
    outcome, t = run({("violence", "low"): [answer(1, ["VI1.a"], 0.9, "threat")]}, ["violence"])
    t.assert_done()
    assert outcome.route is ReasoningRoute.BLOCK and outcome.review_reason is None
    version = LIB.get("violence").version
    assert outcome.rule_ids == ["VI1.a"] and "threat" in outcome.rationale and f"violence {version}" in outcome.rationale
    assert outcome.effort is Effort.LOW and len(outcome.calls) == 1
    assert outcome.policies[0].content_hash == LIB.get("violence").content_hash
    assert outcome.model == "safeguard_standin_cpu"


def test_unsure_answer_escalates_to_high_effort_then_allows() -> None:
    script = {("violence", "low"): [answer(1, ["VI1.a"], 0.4)], ("violence", "high"): [answer(0, ["VI0.a"], 0.9, "idiom")]}
    outcome, t = run(script, ["violence"])
    t.assert_done()
    assert outcome.route is ReasoningRoute.ALLOW
    assert [c.effort for c in outcome.calls] == [Effort.LOW, Effort.HIGH]
    assert outcome.effort is Effort.HIGH and outcome.rule_ids == ["VI0.a"]


def test_unsure_at_every_effort_goes_to_review_as_edge_case() -> None:
    script = {("hate", "low"): [answer(0, ["HT0.a"], 0.5)], ("hate", "high"): [answer(0, ["HT0.a"], 0.55)]}
    outcome, _ = run(script, ["hate"])
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.EDGE_CASE


def test_only_unsure_policies_are_repeated() -> None:
    script = {
        ("violence", "low"): [answer(0, ["VI0.b"], 0.95)],
        ("hate", "low"): [answer(0, ["HT0.c"], 0.3)],
        ("hate", "high"): [answer(1, ["HT1.a"], 0.8, "dehumanising")],
    }
    outcome, t = run(script, ["violence", "hate"])
    t.assert_done()
    assert sorted(t.calls) == sorted([("violence", "low"), ("hate", "low"), ("hate", "high")])
    assert outcome.route is ReasoningRoute.BLOCK and outcome.rule_ids == ["HT1.a"]
    assert "dehumanising" in outcome.rationale and "violence" not in outcome.rationale


def test_unparseable_output_is_recorded_and_not_retried_at_same_effort() -> None:
    script = {
        ("violence", "low"): [render_completion("hmm", "I refuse")],
        ("violence", "high"): [answer(0, ["VI0.a"], 0.9)],
    }
    outcome, t = run(script, ["violence"])
    t.assert_done()
    assert t.calls == [("violence", "low"), ("violence", "high")]
    assert outcome.calls[0].error is not None and outcome.calls[0].error.startswith("ModelOutputError")
    assert outcome.calls[0].violation is None
    assert outcome.route is ReasoningRoute.ALLOW


def test_unusable_output_at_every_effort_fails_closed() -> None:
    script = {("violence", "low"): [render_completion("a", "")], ("violence", "high"): ["no channels at all"]}
    outcome, _ = run(script, ["violence"])
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.REASONER_FAILED


def test_down_reasoner_is_retried_with_bounded_attempts_then_review() -> None:
    down = [ReasonerUnavailable("connection refused")] * 3
    outcome, t = run({("violence", "low"): down}, ["violence"])
    t.assert_done()  # exactly max_attempts tries, and no higher-effort round against a dead server
    assert len(t.calls) == 3
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.REASONER_FAILED
    assert len(outcome.calls) == 1 and "ReasonerUnavailable" in (outcome.calls[0].error or "")
    assert "failed" in outcome.rationale and outcome.rule_ids == []


def test_transient_failure_is_retried() -> None:
    script = {("violence", "low"): [ReasonerUnavailable("blip"), answer(1, ["VI1.b"], 0.8)]}
    outcome, t = run(script, ["violence"])
    t.assert_done()
    assert outcome.route is ReasoningRoute.BLOCK and outcome.calls[0].error is None


def test_timeout_is_a_recorded_failure() -> None:
    class Slow(ScriptedTransport):
        async def generate(self, prompt: str, request_id: str) -> str:
            self.calls.append(("slow", request_id))
            await asyncio.sleep(5)
            return ""

    transport = Slow(LIB, {})
    settings = TritonSettings(request_timeout_s=0.05, max_attempts=2, backoff_initial_s=0.001)
    reasoner = SafeguardReasoner(settings, ReasonerSettings(), LIB, transport=transport)
    outcome = asyncio.run(reasoner.judge(ITEM, ["violence"]))
    assert len(transport.calls) == 2
    assert "ReasonerTimeout" in (outcome.calls[0].error or "")
    assert outcome.review_reason is ReviewReason.REASONER_FAILED


def test_sexual_minors_violation_goes_to_humans() -> None:
    script = {("sexual_minors", "low"): [answer(1, ["SM1.b"], 0.95)], ("sexual_minors", "high"): [answer(1, ["SM1.b"], 0.95)]}
    outcome, _ = run(script, ["sexual_minors"])
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.POLICY_ESCALATE
    assert outcome.rule_ids == ["SM1.b"]


def test_undefined_rule_ids_never_reach_the_outcome() -> None:
    script = {("violence", "low"): [answer(1, ["VI1.a", "VI9.x"], 0.9)], ("violence", "high"): [answer(1, ["VI1.a"], 0.9)]}
    outcome, t = run(script, ["violence"])
    t.assert_done()  # the hallucinated citation is asked again at high effort
    assert outcome.rule_ids == ["VI1.a"] and outcome.calls[0].invalid_rule_ids == ["VI9.x"]
    assert outcome.calls[0].escalation_reasons == ["unknown_rules"] and outcome.calls[1].escalation_reasons == []
    assert outcome.route is ReasoningRoute.BLOCK


def test_in_flight_calls_are_bounded_across_judge_calls() -> None:
    state = {"now": 0, "peak": 0}

    class Counting(ScriptedTransport):
        async def generate(self, prompt: str, request_id: str) -> str:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
            await asyncio.sleep(0.01)
            state["now"] -= 1
            return answer(0, [], 0.9)

    reasoner = SafeguardReasoner(TritonSettings(max_in_flight=2), ReasonerSettings(), LIB, transport=Counting(LIB, {}))

    async def go():  # type: ignore[no-untyped-def]
        items = [ContentItem(content_id=f"c{i}", text="x") for i in range(4)]
        return await asyncio.gather(*(reasoner.judge(i, LIB.ids()) for i in items))

    outcomes = asyncio.run(go())
    assert all(o.route is ReasoningRoute.ALLOW for o in outcomes)
    assert state["peak"] == 2


def test_unscripted_call_fails_loudly() -> None:
    with pytest.raises(UnscriptedCall):
        run({}, ["violence"])


def test_unknown_policy_raises() -> None:
    with pytest.raises(PolicyError):
        run({}, ["spam"])


def test_scripted_reasoner_fails_loudly_out_of_script() -> None:
    fake = ScriptedReasoner({})
    with pytest.raises(UnscriptedCall):
        asyncio.run(fake.judge(ITEM, ["violence"]))
    assert fake.judged == [("c1", ["violence"])]
