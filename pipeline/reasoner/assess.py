"""Checking one answer of the reasoning model: a pure function from the answer and its context to an assessment.

Nothing the model says is trusted blindly. An answer is not accepted as it stands when it departs from the
policy's answer format, is unsure (the probability of its verdict from token log-probabilities when the backend
returned them, else the self-reported confidence when the format asks for one), cites rule ids the policy does not
define (hallucinated citations), cites rules whose label disagrees with its answer (or cites none where the format
asks for the deciding rule), contradicts a confident triage score, or says "no violation" about content that was
cut to fit the context; and every answer for a high-risk policy below its escalated effort gets a second look. A
violation under a rule the policy marks for escalation, or an answer carrying the policy's escalation word, goes to
people like a policy whose metadata says so. :func:`pipeline.router.route_reasoning` turns the assessments into the
next step.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.policies import Policy
from pipeline.router import (
    CONTENT_CUT,
    CONTRADICTS_TRIAGE,
    FAILED,
    HIGH_RISK_POLICY,
    INVALID_OUTPUT,
    LOW_CONFIDENCE,
    RULES_DISAGREE,
    UNKNOWN_RULES,
    Assessment,
)
from pipeline.schemas import CallFailure, Effort, ReasonerCall, TriageScores


@dataclass(frozen=True)
class AssessmentBounds:
    """The thresholds an answer is held to (from :class:`pipeline.config.ReasonerSettings`)."""

    min_confidence: float
    triage_confident_above: float
    triage_confident_below: float


def decisive_confidence(call: ReasonerCall) -> float | None:
    """How sure the answer is of its own verdict: the token probability of that verdict when the backend gave
    log-probabilities, else the self-report."""
    if call.verdict_probability is not None and call.violation is not None:
        return call.verdict_probability if call.violation else 1.0 - call.verdict_probability
    return call.confidence


def unaccepted_reasons(
    call: ReasonerCall, policy: Policy, effort: Effort, triage: TriageScores | None, bounds: AssessmentBounds
) -> list[str]:
    """Why ``call`` is not accepted as final, in a fixed order (empty list: accepted)."""
    if call.failure is not None or call.error is not None:
        return [FAILED]
    fmt = policy.answer_format
    reasons: list[str] = []
    if call.output_errors:
        reasons.append(INVALID_OUTPUT)
    confidence = decisive_confidence(call)
    # A format that asks for no confidence (0/1, a label word) is not "unsure" for lack of one.
    if (confidence is None and (fmt.asks_confidence or call.verdict_probability is not None)) or (
        confidence is not None and confidence < bounds.min_confidence
    ):
        reasons.append(LOW_CONFIDENCE)
    if call.invalid_rule_ids:
        reasons.append(UNKNOWN_RULES)
    labels = {rule.label for rule in map(policy.rule, call.rule_ids) if rule is not None}
    if policy.rules and (fmt.asks_rules or labels) and (
        (call.violation and 1 not in labels) or (not call.violation and 1 in labels)
    ):
        reasons.append(RULES_DISAGREE)  # "violation" with no violating rule, or "safe" citing a violating one
    if triage is not None and (
        (not call.violation and triage.violation >= bounds.triage_confident_above)
        or (call.violation and triage.violation <= bounds.triage_confident_below)
    ):
        reasons.append(CONTRADICTS_TRIAGE)
    if call.content_cut and not call.violation:
        reasons.append(CONTENT_CUT)
    if policy.high_risk and Effort(effort).rank < policy.escalated_effort.rank:
        reasons.append(HIGH_RISK_POLICY)
    return reasons


def escalates(call: ReasonerCall, policy: Policy) -> bool:
    """People decide a violation under this policy: its metadata says so, the answer asks for it, or a cited rule
    is one the policy marks for escalation."""
    return policy.escalate_to_humans or call.escalate or any(
        rule is not None and rule.escalate for rule in map(policy.rule, call.rule_ids)
    )


def assess(
    call: ReasonerCall, policy: Policy, effort: Effort, triage: TriageScores | None, bounds: AssessmentBounds
) -> Assessment:
    """The router's view of one policy's latest answer."""
    return Assessment(
        policy_id=policy.policy_id,
        violation=call.violation,
        reasons=tuple(unaccepted_reasons(call, policy, effort, triage, bounds)),
        # A call recorded before failures had kinds carries only ``error``: treat it as a failed answer, not as
        # a transport failure, so it is asked again rather than trusted.
        failure=call.failure or (CallFailure.INVALID_OUTPUT if call.error is not None else None),
        can_raise_effort=policy.escalated_effort.rank > Effort(effort).rank,
        escalate_to_humans=escalates(call, policy),
    )
