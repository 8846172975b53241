"""Routing: pure functions from evidence to a route. No I/O, so every branch is a unit test.

Two decisions live here:

* :func:`route_triage` -- after the cheap classifier: allow or block at once when it is confident, otherwise
  escalate (hide provisionally, ask the reasoner). High-risk categories escalate even when the classifier
  would block, because a wrong automatic removal there (a self-harm disclosure, a survivor's account) is costly.
* :func:`route_reasoning` -- after the reasoning model: a confident answer is final; an unsure one goes to the
  next effort; unsure at the highest effort, a policy that says "escalate", or a failing model goes to review.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pipeline.schemas import EscalationReason, ReasonerCall, ReviewReason, TriageScores


class TriageRoute(str, enum.Enum):
    ALLOW = "allow"
    BLOCK = "block"
    ESCALATE = "escalate"


@dataclass(frozen=True)
class TriageThresholds:
    """Decision bands of the triage artefact (``thresholds.json``).

    ``violation < allow_below`` allows, ``violation >= block_above`` blocks, anything between escalates. A
    category in ``high_risk`` escalates when its probability reaches the given value, whatever the band says.
    ``category_policies`` maps each classifier category to the policy the reasoner checks for it.
    """

    allow_below: float
    block_above: float
    high_risk: dict[str, float] = field(default_factory=dict)
    category_policies: dict[str, str] = field(default_factory=dict)
    policy_floor: float = 0.1  # a category at or above this probability is worth a reasoner call

    def __post_init__(self) -> None:
        if not 0.0 <= self.allow_below <= self.block_above <= 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 <= allow_below <= block_above <= 1, "
                f"got allow_below={self.allow_below} block_above={self.block_above}"
            )


@dataclass(frozen=True)
class TriageDecision:
    route: TriageRoute
    reason: EscalationReason | None = None
    policy_ids: tuple[str, ...] = ()


def _policies_to_check(scores: TriageScores, thresholds: TriageThresholds, enforcing: list[str]) -> tuple[str, ...]:
    """The policies worth a reasoner call: those whose categories score at or above the floor, else the top one."""
    ranked = sorted(scores.categories.items(), key=lambda kv: kv[1], reverse=True)
    chosen: list[str] = []
    for category, probability in ranked:
        policy = thresholds.category_policies.get(category)
        if policy is None or policy not in enforcing or policy in chosen:
            continue
        if probability >= thresholds.policy_floor or not chosen:
            chosen.append(policy)
    if not chosen:
        chosen = list(enforcing)
    return tuple(chosen)


def route_triage(
    scores: TriageScores, thresholds: TriageThresholds, enforcing_policies: list[str]
) -> TriageDecision:
    """Decide what happens to an item after triage."""
    high_risk_hit = any(
        scores.categories.get(category, 0.0) >= level for category, level in thresholds.high_risk.items()
    )
    if high_risk_hit:
        return TriageDecision(
            TriageRoute.ESCALATE,
            EscalationReason.HIGH_RISK,
            _policies_to_check(scores, thresholds, enforcing_policies),
        )
    if scores.violation < thresholds.allow_below:
        # A policy the classifier has no category for (e.g. fraud/spam, asked for by the producer) cannot be
        # cleared by triage: only the reasoner can say the item does not violate it.
        covered = set(thresholds.category_policies.values())
        uncovered = tuple(p for p in enforcing_policies if p not in covered)
        if uncovered:
            return TriageDecision(TriageRoute.ESCALATE, EscalationReason.AMBIGUOUS, uncovered)
        return TriageDecision(TriageRoute.ALLOW)
    if scores.violation >= thresholds.block_above:
        return TriageDecision(TriageRoute.BLOCK, policy_ids=_policies_to_check(scores, thresholds, enforcing_policies))
    return TriageDecision(
        TriageRoute.ESCALATE, EscalationReason.AMBIGUOUS, _policies_to_check(scores, thresholds, enforcing_policies)
    )


class ReasoningRoute(str, enum.Enum):
    ALLOW = "allow"  # final: no checked policy is violated
    BLOCK = "block"  # final: at least one policy is confidently violated
    RETRY_HIGHER_EFFORT = "retry_higher_effort"
    REVIEW = "review"


@dataclass(frozen=True)
class ReasoningDecision:
    route: ReasoningRoute
    review_reason: ReviewReason | None = None


def route_reasoning(
    calls: list[ReasonerCall],
    *,
    min_confidence: float,
    can_raise_effort: bool,
    escalate_to_humans: bool = False,
) -> ReasoningDecision:
    """Decide after one round of reasoning calls (one call per policy, all at the same effort).

    ``calls`` are this round's answers. A confident violation of any policy blocks, even if another policy's
    call failed: the item is removed either way. Otherwise every policy must be answered confidently "no" to
    allow. ``escalate_to_humans`` is set for high-risk policies whose metadata says a violation goes to people.
    """
    if not calls:
        raise ValueError("route_reasoning needs at least one reasoner call")
    confident = [c for c in calls if c.error is None and c.confidence is not None and c.confidence >= min_confidence]
    if any(c.violation for c in confident):
        if escalate_to_humans:
            return ReasoningDecision(ReasoningRoute.REVIEW, ReviewReason.POLICY_ESCALATE)
        return ReasoningDecision(ReasoningRoute.BLOCK)
    failed = [c for c in calls if c.error is not None]
    if len(confident) == len(calls):
        return ReasoningDecision(ReasoningRoute.ALLOW)
    if can_raise_effort:
        return ReasoningDecision(ReasoningRoute.RETRY_HIGHER_EFFORT)
    if failed:
        return ReasoningDecision(ReasoningRoute.REVIEW, ReviewReason.REASONER_FAILED)
    return ReasoningDecision(ReasoningRoute.REVIEW, ReviewReason.EDGE_CASE)
