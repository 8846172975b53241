"""The reasoner's escalation, retries, parsing and routing, driven by a scripted transport (no server)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

import pytest

from pipeline.config import PROJECT_ROOT, ReasonerSettings, TritonSettings
from pipeline.errors import PolicyError, ReasonerUnavailable
from pipeline.policies import AnswerFormat, PolicyLibrary
from pipeline.reasoner.backends import GenerateResult
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.reasoner.fakes import ScriptedReasoner, ScriptedTransport, UnscriptedCall, answer
from pipeline.reasoner.harmony import render_completion
from pipeline.router import ReasoningRoute
from pipeline.schemas import CallFailure, ContentItem, Effort, ReviewReason

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
        async def generate(self, prompt: str, request_id: str, sampling: dict | None = None) -> str:
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
        async def generate(self, prompt: str, request_id: str, sampling: dict | None = None) -> str:
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


# -- the client owns its parameters; truncation is its own failure; tokens are counted --------------------------

def test_every_call_sets_the_parameters_its_parsing_depends_on() -> None:
    script = {("violence", "low"): [answer(1, ["VI1.a"], 0.4)], ("violence", "high"): [answer(1, ["VI1.a"], 0.9)]}
    _, t = run(script, ["violence"])
    low, high = t.sampling
    assert low["max_tokens"] == ReasonerSettings().max_tokens_low and high["max_tokens"] == ReasonerSettings().max_tokens_high
    for params in (low, high):
        assert params["skip_special_tokens"] is False and params["spaces_between_special_tokens"] is False
        assert params["stop_token_ids"] == [200002, 200012] and params["include_stop_str_in_output"] is False
        assert params["temperature"] == 0.0 and params["logprobs"] == ReasonerSettings().logprobs


def test_backend_token_counts_are_recorded_and_counted_in_metrics() -> None:
    from prometheus_client import REGISTRY

    def sample(direction: str) -> float:
        return REGISTRY.get_sample_value("modpipe_reasoner_tokens_total",
                                         {"direction": direction, "policy": "violence", "effort": "low"}) or 0.0

    before = sample("input"), sample("output")
    result = GenerateResult(answer(1, ["VI1.a"], 0.9), "stop", prompt_tokens=700, completion_tokens=321)
    outcome, _ = run({("violence", "low"): [result]}, ["violence"])
    call = outcome.calls[0]
    assert (call.prompt_tokens, call.completion_tokens, call.tokens_from_backend) == (700, 321, True)
    assert (call.finish_reason, call.max_tokens, call.truncation_retries) == ("stop", 4096, 0)
    assert (sample("input") - before[0], sample("output") - before[1]) == (700, 321)


def test_tokens_are_counted_here_when_the_backend_reports_none() -> None:
    outcome, _ = run({("violence", "low"): [answer(0, ["VI0.a"], 0.9)]}, ["violence"])
    call = outcome.calls[0]
    assert call.tokens_from_backend is False and call.prompt_tokens > 500 and call.completion_tokens > 20


def test_truncated_answer_is_retried_once_with_a_larger_budget() -> None:
    cut = GenerateResult("<|channel|>analysis<|message|>The content", "length", prompt_tokens=650, completion_tokens=4096)
    whole = GenerateResult(answer(1, ["VI1.a"], 0.9), "stop", prompt_tokens=650, completion_tokens=5000)
    outcome, t = run({("violence", "low"): [cut, whole]}, ["violence"])
    t.assert_done()
    assert [s["max_tokens"] for s in t.sampling] == [4096, 8192]
    call = outcome.calls[0]
    assert outcome.route is ReasoningRoute.BLOCK and call.truncation_retries == 1 and call.max_tokens == 8192
    assert (call.prompt_tokens, call.completion_tokens) == (1300, 9096)  # both attempts were spent


def test_answer_truncated_twice_fails_closed_as_truncated_without_a_harder_look() -> None:
    cut = GenerateResult("<|channel|>analysis<|message|>Still thinking", "length", completion_tokens=4096)
    outcome, t = run({("violence", "low"): [cut, cut]}, ["violence"])
    t.assert_done()  # no high-effort round: it would write more, not less
    call = outcome.calls[0]
    assert call.failure is CallFailure.TRUNCATED and "cut off at 8192 output tokens" in (call.error or "")
    assert call.analysis == "Still thinking" and call.violation is None
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.REASONER_FAILED


def test_server_without_finish_reasons_is_still_caught_at_its_budget() -> None:
    def cut(tokens: int) -> GenerateResult:
        return GenerateResult("<|channel|>analysis<|message|>on and on", None, completion_tokens=tokens)

    outcome, t = run({("violence", "low"): [cut(4096), cut(8192)]}, ["violence"])
    t.assert_done()
    assert outcome.calls[0].failure is CallFailure.TRUNCATED


def test_truncation_retry_stays_inside_the_context() -> None:
    settings = ReasonerSettings(max_tokens_low=3000, max_tokens_high=3000, max_model_len=4000)
    cut = GenerateResult("<|channel|>analysis<|message|>x", "length", prompt_tokens=700, completion_tokens=3000)
    transport = ScriptedTransport(LIB, {("violence", "low"): [cut, cut]})
    reasoner = SafeguardReasoner(FAST, settings, LIB, transport=transport)
    outcome = asyncio.run(reasoner.judge(ITEM, ["violence"]))
    assert [s["max_tokens"] for s in transport.sampling] == [3000, 3300]  # 4000 - 700, not 6000
    assert outcome.calls[0].failure is CallFailure.TRUNCATED


def test_overlong_content_is_cut_by_the_documented_rule_and_a_safe_answer_goes_to_review() -> None:
    settings = ReasonerSettings(max_tokens_low=1024, max_tokens_high=1024, max_model_len=2400)
    long_text = "word " * 3000
    script = {("violence", "low"): [answer(0, ["VI0.a"], 0.95)]}
    transport = ScriptedTransport(LIB, script)
    reasoner = SafeguardReasoner(FAST, settings, LIB, transport=transport)
    outcome = asyncio.run(reasoner.judge(ContentItem(content_id="long", text=long_text), ["violence"]))
    call = outcome.calls[0]
    assert call.content_cut and "cut" in call.content_cut and "content_cut" in call.escalation_reasons
    assert "tokens of the content were cut here" in transport.prompts[0]
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.EDGE_CASE
    violating = ScriptedTransport(LIB, {("violence", "low"): [answer(1, ["VI1.a"], 0.95)]})
    blocked = asyncio.run(SafeguardReasoner(FAST, settings, LIB, transport=violating).judge(
        ContentItem(content_id="long2", text=long_text), ["violence"]))
    assert blocked.route is ReasoningRoute.BLOCK and blocked.calls[0].content_cut


def test_a_context_that_leaves_no_room_for_content_is_a_configuration_error() -> None:
    with pytest.raises(PolicyError, match="max_model_len"):
        SafeguardReasoner(FAST, ReasonerSettings(max_tokens_high=32000, max_model_len=32768), LIB,
                          transport=ScriptedTransport(LIB, {}))


def test_logprob_probability_decides_beside_the_self_report() -> None:
    import math

    from pipeline.reasoner.logprobs import TokenLogprob

    text = answer(1, ["VI1.a"], 0.95, "threat")  # sure of itself in words
    final = text.split("<|message|>")[-1].split("<|return|>")[0]
    head = text[: text.index('"violation": ') + len('"violation": ')]
    lp = (TokenLogprob(head, -0.01), TokenLogprob("1", math.log(0.55), (("0", math.log(0.45)),)),
          TokenLogprob(final[final.index("1") + 1:], -0.01))
    unsure = GenerateResult(text.replace("<|return|>", ""), "stop", logprobs=lp)
    sure = GenerateResult(answer(1, ["VI1.a"], 0.95), "stop")
    outcome, t = run({("violence", "low"): [unsure], ("violence", "high"): [sure]}, ["violence"])
    t.assert_done()
    first = outcome.calls[0]
    assert first.confidence == 0.95 and first.verdict_probability == pytest.approx(0.55)
    assert first.escalation_reasons == ["low_confidence"]  # the token probability, not the words, decided
    assert outcome.route is ReasoningRoute.BLOCK


# -- policies in the guide's other formats --------------------------------------------------------------------

@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> PolicyLibrary:
    from pipeline.policies.importer import import_policy

    fixtures = PROJECT_ROOT / "tests" / "fixtures" / "policies"
    root = tmp_path_factory.mktemp("imported")
    import_policy(fixtures / "junk_mail", "junk_mail", root)
    import_policy(fixtures / "dc_pack", "dc_pack", root)
    import_policy(fixtures / "hostility_md", "hostility", root)
    return PolicyLibrary.load(root)


def judge_with(library: PolicyLibrary, script: dict, policy: str):  # type: ignore[no-untyped-def]
    transport = ScriptedTransport(library, script)
    reasoner = SafeguardReasoner(FAST, ReasonerSettings(), library, transport=transport)
    return asyncio.run(reasoner.judge(ITEM, [policy])), transport


def test_label_answers_decide_without_a_confidence(imported: PolicyLibrary) -> None:
    safe = render_completion("a personal note", "VALID (JM0.b)")
    outcome, t = judge_with(imported, {("junk_mail", "low"): [safe]}, "junk_mail")
    t.assert_done()
    assert outcome.route is ReasoningRoute.ALLOW and outcome.calls[0].escalation_reasons == []
    assert outcome.rule_ids == ["JM0.b"]


def test_escalation_word_and_escalating_rule_send_a_violation_to_people(imported: PolicyLibrary) -> None:
    assert imported.get("junk_mail").rule("JM4.a").escalate  # "Output: INVALID + ESCALATE" in its section
    outcome, _ = judge_with(imported, {("junk_mail", "low"): [render_completion("bait", "INVALID + ESCALATE (JM4.a)")]},
                            "junk_mail")
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.POLICY_ESCALATE
    assert outcome.calls[0].escalate
    plain, _ = judge_with(imported, {("junk_mail", "low"): [render_completion("advert", "INVALID (JM2.a)")]},
                          "junk_mail")
    assert plain.route is ReasoningRoute.BLOCK


def test_binary_and_policy_referencing_answers_are_final(imported: PolicyLibrary) -> None:
    outcome, _ = judge_with(imported, {("dc_pack", "low"): [render_completion("a dare", "1")]}, "dc_pack")
    assert outcome.route is ReasoningRoute.BLOCK and outcome.calls[0].output_errors == []
    cited, _ = judge_with(imported, {("hostility", "low"): [render_completion(
        "insult", '{"violation": 1, "policy_category": "H2.d"}')]}, "hostility")
    assert cited.route is ReasoningRoute.BLOCK and cited.rule_ids == ["H2.d"]


def test_unreadable_answer_format_fails_closed_without_a_model_call(imported: PolicyLibrary) -> None:
    policy = imported.get("dc_pack")
    library = PolicyLibrary({"dc_pack": dataclasses.replace(policy, answer_format=AnswerFormat("xml", ()))})
    outcome, t = judge_with(library, {}, "dc_pack")
    assert t.calls == []
    assert outcome.calls[0].failure is CallFailure.UNSUPPORTED_FORMAT and "'xml'" in (outcome.calls[0].error or "")
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.REASONER_FAILED


def test_tokens_of_an_unreadable_answer_are_still_counted() -> None:
    broken = GenerateResult("<|channel|>analysis<|message|>hmm<|end|>", "stop", prompt_tokens=680, completion_tokens=9)
    outcome, _ = run({("violence", "low"): [broken], ("violence", "high"): [answer(0, ["VI0.a"], 0.9)]}, ["violence"])
    first = outcome.calls[0]
    assert first.failure is CallFailure.INVALID_OUTPUT and "analysis only" in (first.error or "")
    assert (first.prompt_tokens, first.completion_tokens, first.analysis) == (680, 9, "hmm")
