import pytest

from pipeline.router import (
    CONTENT_CUT,
    FAILED,
    HIGH_RISK_POLICY,
    LOW_CONFIDENCE,
    Assessment,
    ReasoningRoute,
    TriageRoute,
    TriageThresholds,
    route_reasoning,
    route_triage,
)
from pipeline.schemas import CallFailure, EscalationReason, ReviewReason, TriageScores

pytestmark = pytest.mark.unit

THRESHOLDS = TriageThresholds(
    allow_below=0.2,
    block_above=0.9,
    high_risk={"SH": 0.3},
    category_policies={"H": "hate", "V": "violence", "SH": "self_harm"},
    policy_floor=0.1,
)
ENFORCING = ["hate", "violence", "self_harm"]


def scores(violation: float, **categories: float) -> TriageScores:
    return TriageScores(model_version="t", violation=violation, categories=categories, latency_ms=1.0)


def test_route_low_score_allows() -> None:
    assert route_triage(scores(0.05, H=0.01), THRESHOLDS, ENFORCING).route is TriageRoute.ALLOW


def test_route_high_score_blocks_with_policies() -> None:
    decision = route_triage(scores(0.95, V=0.9, H=0.02), THRESHOLDS, ENFORCING)
    assert decision.route is TriageRoute.BLOCK
    assert decision.policy_ids == ("violence",)


def test_route_middle_band_escalates_as_ambiguous() -> None:
    decision = route_triage(scores(0.5, H=0.4, V=0.3), THRESHOLDS, ENFORCING)
    assert decision.route is TriageRoute.ESCALATE
    assert decision.reason is EscalationReason.AMBIGUOUS
    assert decision.policy_ids == ("hate", "violence")


def test_route_high_risk_category_escalates_even_when_confident() -> None:
    decision = route_triage(scores(0.99, SH=0.8), THRESHOLDS, ENFORCING)
    assert decision.route is TriageRoute.ESCALATE
    assert decision.reason is EscalationReason.HIGH_RISK
    assert "self_harm" in decision.policy_ids


def test_route_picks_top_category_when_all_below_floor() -> None:
    decision = route_triage(scores(0.5, H=0.05, V=0.08), THRESHOLDS, ENFORCING)
    assert decision.policy_ids == ("violence",)


BANDED = TriageThresholds(
    allow_below=0.2, block_above=0.9, high_risk={"SH": 0.3},
    category_policies={"H": "hate", "V": "violence", "SH": "self_harm"},
    category_bands={"H": (0.3, 0.8), "V": (1.0, 0.85), "SH": (0.1, 0.5)}, languages=("en",),
)


def test_route_confident_category_band_blocks_under_its_policy() -> None:
    decision = route_triage(scores(0.6, H=0.85, V=0.2), BANDED, ENFORCING)
    assert decision.route is TriageRoute.BLOCK
    assert decision.policy_ids == ("hate",)
    assert "H" in decision.note


def test_route_category_band_never_blocks_a_high_risk_category_or_an_unenforced_policy() -> None:
    assert route_triage(scores(0.6, SH=0.6), BANDED, ENFORCING).route is TriageRoute.ESCALATE
    assert route_triage(scores(0.6, H=0.85), BANDED, ["violence"]).route is TriageRoute.ESCALATE


def test_route_unsure_category_keeps_a_low_any_score_from_auto_allow() -> None:
    decision = route_triage(scores(0.1, H=0.4), BANDED, ENFORCING)
    assert decision.route is TriageRoute.ESCALATE and decision.reason is EscalationReason.AMBIGUOUS
    assert "allow level" in decision.note
    assert route_triage(scores(0.1, H=0.2, V=0.5), BANDED, ENFORCING).route is TriageRoute.ALLOW  # V allow at 1.0


def test_route_text_in_an_unvalidated_language_escalates_whatever_the_score() -> None:
    for language in ("de", "zh", "pt-BR"):
        decision = route_triage(scores(0.01), BANDED, ENFORCING, language=language)
        assert decision.route is TriageRoute.ESCALATE and language in decision.note
    assert route_triage(scores(0.01), BANDED, ENFORCING, language="en").route is TriageRoute.ALLOW
    assert route_triage(scores(0.01), BANDED, ENFORCING, language="EN-gb").route is TriageRoute.ALLOW
    assert route_triage(scores(0.01), BANDED, ENFORCING, language=None).route is TriageRoute.ALLOW
    assert route_triage(scores(0.01), THRESHOLDS, ENFORCING, language="de").route is TriageRoute.ALLOW  # no rule


def test_thresholds_refuse_a_category_level_outside_zero_to_one() -> None:
    with pytest.raises(ValueError):
        TriageThresholds(allow_below=0.2, block_above=0.9, category_bands={"H": (0.2, 1.5)})


def test_route_ignores_non_enforcing_policies() -> None:
    decision = route_triage(scores(0.5, H=0.6, V=0.3), THRESHOLDS, ["violence"])
    assert decision.policy_ids == ("violence",)


def test_thresholds_reject_inverted_band() -> None:
    with pytest.raises(ValueError, match="allow_below"):
        TriageThresholds(allow_below=0.8, block_above=0.2)


def answer(
    violation: bool | None,
    *reasons: str,
    policy_id: str = "hate",
    can_raise_effort: bool = False,
    failure: CallFailure | None = None,
    escalate_to_humans: bool = False,
) -> Assessment:
    return Assessment(policy_id, violation, tuple(reasons), failure, can_raise_effort, escalate_to_humans)


def test_reasoning_confident_violation_blocks() -> None:
    result = route_reasoning([answer(True), answer(False, LOW_CONFIDENCE, policy_id="violence")])
    assert result.route is ReasoningRoute.BLOCK


def test_reasoning_asks_the_unsure_policy_again_before_blocking_on_another() -> None:
    # A policy whose violations go to people could still take precedence over the removal.
    result = route_reasoning([answer(True), answer(False, LOW_CONFIDENCE, policy_id="violence", can_raise_effort=True)])
    assert (result.route, result.retry_policy_ids) == (ReasoningRoute.RETRY_HIGHER_EFFORT, ("violence",))


def test_reasoning_all_confident_safe_allows() -> None:
    result = route_reasoning([answer(False), answer(False, policy_id="violence")])
    assert result.route is ReasoningRoute.ALLOW


def test_reasoning_unsure_raises_effort_first() -> None:
    result = route_reasoning([answer(True, LOW_CONFIDENCE, can_raise_effort=True)])
    assert result.route is ReasoningRoute.RETRY_HIGHER_EFFORT


def test_reasoning_high_risk_answer_gets_a_second_look_even_when_settled() -> None:
    result = route_reasoning([answer(True, HIGH_RISK_POLICY, can_raise_effort=True)])
    assert result.route is ReasoningRoute.RETRY_HIGHER_EFFORT


def test_reasoning_unsure_at_high_effort_goes_to_review() -> None:
    result = route_reasoning([answer(True, LOW_CONFIDENCE)])
    assert (result.route, result.review_reason) == (ReasoningRoute.REVIEW, ReviewReason.EDGE_CASE)


def test_reasoner_failure_fails_closed_to_review() -> None:
    result = route_reasoning([answer(None, FAILED, failure=CallFailure.UNAVAILABLE)])
    assert (result.route, result.review_reason) == (ReasoningRoute.REVIEW, ReviewReason.REASONER_FAILED)


def test_transport_failure_is_not_asked_again_at_a_higher_effort() -> None:
    result = route_reasoning([answer(None, FAILED, failure=CallFailure.TIMEOUT, can_raise_effort=True)])
    assert (result.route, result.review_reason) == (ReasoningRoute.REVIEW, ReviewReason.REASONER_FAILED)


def test_unreadable_output_is_asked_again_at_a_higher_effort() -> None:
    result = route_reasoning([answer(None, FAILED, failure=CallFailure.INVALID_OUTPUT, can_raise_effort=True)])
    assert result.route is ReasoningRoute.RETRY_HIGHER_EFFORT


def test_escalate_to_humans_policy_sends_violation_to_review() -> None:
    result = route_reasoning([answer(True, escalate_to_humans=True)])
    assert (result.route, result.review_reason) == (ReasoningRoute.REVIEW, ReviewReason.POLICY_ESCALATE)


@pytest.mark.parametrize("failure", [CallFailure.TRUNCATED, CallFailure.UNSUPPORTED_FORMAT])
def test_truncated_or_unreadable_format_is_not_asked_harder_and_goes_to_review(failure: CallFailure) -> None:
    # a higher effort writes more (the answer was already cut off at a larger budget); a format stays unreadable
    result = route_reasoning([answer(None, FAILED, failure=failure, can_raise_effort=True)])
    assert (result.route, result.review_reason) == (ReasoningRoute.REVIEW, ReviewReason.REASONER_FAILED)


def test_safe_answer_on_cut_content_goes_to_review_without_a_pointless_second_look() -> None:
    result = route_reasoning([answer(False, CONTENT_CUT, can_raise_effort=True)])
    assert (result.route, result.review_reason) == (ReasoningRoute.REVIEW, ReviewReason.EDGE_CASE)


def test_reasoning_needs_calls() -> None:
    with pytest.raises(ValueError):
        route_reasoning([])


def test_route_requested_policy_without_triage_category_escalates_instead_of_allowing() -> None:
    decision = route_triage(scores(0.01, H=0.01), THRESHOLDS, ["hate", "fraud_spam"])
    assert decision.route is TriageRoute.ESCALATE
    assert decision.policy_ids == ("fraud_spam",)


def test_route_uncovered_policy_does_not_stop_a_confident_block() -> None:
    decision = route_triage(scores(0.95, V=0.9), THRESHOLDS, ["violence", "fraud_spam"])
    assert decision.route is TriageRoute.BLOCK
