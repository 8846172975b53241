"""Routing: pure functions from evidence to a route. No I/O, so every branch is a unit test.

Two decisions live here:

* :func:`route_triage` -- after the cheap classifier: allow or block at once when it is confident, otherwise
  escalate (hide provisionally, ask the reasoner). High-risk categories escalate even when the classifier
  would block, because a wrong automatic removal there (a self-harm disclosure, a survivor's account) is costly.
* :func:`route_reasoning` -- after each round of reasoning calls, from each policy's :class:`Assessment`: an
  answer that failed a check goes to the next effort; a settled answer is final; unsure at the highest effort, a
  policy that says "escalate", or a failing model goes to review.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.schemas import TRANSPORT_FAILURES, CallFailure, EscalationReason, ReviewReason, TriageScores


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

    ``category_bands`` (per category ``(allow_below, block_above)``, chosen on that head's own out-of-fold scores):
    a category at or above its block level blocks under its policy even when the ``any`` score sits in the band;
    a category at or above its allow level keeps the item from being auto-allowed. A category without a band
    only ranks the policies to check. ``languages``: the languages the artefact was validated on; a text detected
    in another one is escalated, never auto-decided (empty: no language rule).
    """

    allow_below: float
    block_above: float
    high_risk: dict[str, float] = field(default_factory=dict)
    category_policies: dict[str, str] = field(default_factory=dict)
    policy_floor: float = 0.1  # a category at or above this probability is worth a reasoner call
    category_bands: dict[str, tuple[float, float]] = field(default_factory=dict)
    languages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0.0 <= self.allow_below <= self.block_above <= 1.0:
            raise ValueError(
                f"thresholds must satisfy 0 <= allow_below <= block_above <= 1, "
                f"got allow_below={self.allow_below} block_above={self.block_above}"
            )
        for category, (low, high) in self.category_bands.items():
            # allow 1.0 with block 0.85 is valid: that category blocks when confident and never vetoes auto-allow.
            if not (0.0 <= low <= 1.0 and 0.0 <= high <= 1.0):
                raise ValueError(f"category band {category} levels must lie in [0, 1], got {low}, {high}")


@dataclass(frozen=True)
class TriageDecision:
    route: TriageRoute
    reason: EscalationReason | None = None
    policy_ids: tuple[str, ...] = ()
    note: str = ""  # why, when the `any` band alone would have decided otherwise (a category, the language)


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
    scores: TriageScores, thresholds: TriageThresholds, enforcing_policies: list[str], *, language: str | None = None
) -> TriageDecision:
    """Decide what happens to an item after triage.

    ``language``: the item's detected (or declared) language, ``None`` when unknown; with ``thresholds.languages``
    set, an item in another language is escalated whatever its scores.
    """
    high_risk_hit = any(
        scores.categories.get(category, 0.0) >= level for category, level in thresholds.high_risk.items()
    )
    if high_risk_hit:
        return TriageDecision(
            TriageRoute.ESCALATE,
            EscalationReason.HIGH_RISK,
            _policies_to_check(scores, thresholds, enforcing_policies),
        )
    if thresholds.languages and language is not None and language.split("-")[0].lower() not in thresholds.languages:
        return TriageDecision(TriageRoute.ESCALATE, EscalationReason.AMBIGUOUS,
                              _policies_to_check(scores, thresholds, enforcing_policies),
                              note=f"language {language} is not one triage was validated on")
    bands = thresholds.category_bands
    confident = [c for c, (_, block) in bands.items() if c not in thresholds.high_risk
                 and thresholds.category_policies.get(c) in enforcing_policies and scores.categories.get(c, 0.0) >= block]
    if scores.violation >= thresholds.block_above or confident:
        policies = _policies_to_check(scores, thresholds, enforcing_policies)
        if scores.violation < thresholds.block_above:  # blocked on a category head's own confident band
            named = tuple(dict.fromkeys(thresholds.category_policies[c] for c in confident))
            return TriageDecision(TriageRoute.BLOCK, policy_ids=named,
                                  note=f"category {', '.join(confident)} at or above its block level")
        return TriageDecision(TriageRoute.BLOCK, policy_ids=policies)
    unsure = [c for c, (allow, _) in bands.items() if scores.categories.get(c, 0.0) >= allow]
    if scores.violation < thresholds.allow_below and not unsure:
        # A policy the classifier has no category for (e.g. fraud/spam, asked for by the producer) cannot be
        # cleared by triage: only the reasoner can say the item does not violate it.
        covered = set(thresholds.category_policies.values())
        uncovered = tuple(p for p in enforcing_policies if p not in covered)
        if uncovered:
            return TriageDecision(TriageRoute.ESCALATE, EscalationReason.AMBIGUOUS, uncovered)
        return TriageDecision(TriageRoute.ALLOW)
    return TriageDecision(
        TriageRoute.ESCALATE, EscalationReason.AMBIGUOUS, _policies_to_check(scores, thresholds, enforcing_policies),
        note=f"category {', '.join(unsure)} above its allow level" if unsure and
        scores.violation < thresholds.allow_below else "",
    )


class ReasoningRoute(str, enum.Enum):
    ALLOW = "allow"  # final: no checked policy is violated
    BLOCK = "block"  # final: at least one policy is confidently violated
    RETRY_HIGHER_EFFORT = "retry_higher_effort"
    REVIEW = "review"


# Why an answer was not accepted (ReasonerCall.escalation_reasons). The UNSETTLING ones keep an answer unsettled
# at the top effort (review); CONTRADICTS_TRIAGE and HIGH_RISK_POLICY only ask for a second look at the higher
# effort. CONTENT_CUT (a "no violation" answer about content cut to fit the context) is unsettling, and asking
# harder cannot help it: the cut part stays unread.
INVALID_OUTPUT, LOW_CONFIDENCE, UNKNOWN_RULES, RULES_DISAGREE, FAILED = (
    "invalid_output", "low_confidence", "unknown_rules", "rules_disagree", "failed",
)
CONTRADICTS_TRIAGE, HIGH_RISK_POLICY, CONTENT_CUT = "contradicts_triage", "high_risk_policy", "content_cut"
UNSETTLING = frozenset({INVALID_OUTPUT, LOW_CONFIDENCE, UNKNOWN_RULES, RULES_DISAGREE, FAILED, CONTENT_CUT})
NO_SECOND_LOOK_REASONS = frozenset({CONTENT_CUT})
# Failures a higher effort cannot fix: a down server (its retries are spent), an answer already cut off at a larger
# budget (higher effort writes more), a policy whose answer format cannot be read.
NO_SECOND_LOOK_FAILURES = TRANSPORT_FAILURES | {CallFailure.TRUNCATED, CallFailure.UNSUPPORTED_FORMAT}


@dataclass(frozen=True)
class Assessment:
    """What the reasoner concluded about one policy's latest answer (built by :func:`pipeline.reasoner.assess.assess`).

    ``reasons`` say why the answer is not accepted as it stands (empty: accepted). ``failure`` is set when the call
    itself failed, by kind, so routing never has to read error strings.
    """

    policy_id: str
    violation: bool | None
    reasons: tuple[str, ...] = ()
    failure: CallFailure | None = None
    can_raise_effort: bool = False  # the policy's escalated effort is above the effort of this answer
    escalate_to_humans: bool = False  # the policy (or the rule cited, or the answer) says people decide a violation

    @property
    def settled(self) -> bool:
        """The answer can decide: it failed no check that makes it unusable."""
        return self.failure is None and not (set(self.reasons) & UNSETTLING)

    @property
    def wants_second_look(self) -> bool:
        """Ask again at the higher effort: a check that a harder look can change failed, the effort can go up, and
        the call did not fail in a way effort cannot fix (a down server, an answer cut off even at a larger
        budget, an unreadable answer format)."""
        return (bool(set(self.reasons) - NO_SECOND_LOOK_REASONS) and self.can_raise_effort
                and self.failure not in NO_SECOND_LOOK_FAILURES)


@dataclass(frozen=True)
class ReasoningDecision:
    route: ReasoningRoute
    review_reason: ReviewReason | None = None
    retry_policy_ids: tuple[str, ...] = ()  # for RETRY_HIGHER_EFFORT: the policies to ask again


def route_reasoning(assessments: Sequence[Assessment]) -> ReasoningDecision:
    """Decide after a round of reasoning calls, from each policy's latest assessment.

    Any answer that wants a second look is asked again first (even when another policy already blocks: a policy
    whose violations go to people would take precedence over that removal). Then a settled violation of any
    policy blocks, even if another policy's call failed: the item is removed either way; a settled violation of a
    policy whose metadata says humans decide goes to review instead. Every policy settled "no" allows. What is left
    goes to review: as a reasoner failure when a call failed, else as an edge case.
    """
    if not assessments:
        raise ValueError("route_reasoning needs at least one assessment")
    retry = tuple(a.policy_id for a in assessments if a.wants_second_look)
    if retry:
        return ReasoningDecision(ReasoningRoute.RETRY_HIGHER_EFFORT, retry_policy_ids=retry)
    violated = [a for a in assessments if a.settled and a.violation]
    if violated:
        if any(a.escalate_to_humans for a in violated):
            return ReasoningDecision(ReasoningRoute.REVIEW, ReviewReason.POLICY_ESCALATE)
        return ReasoningDecision(ReasoningRoute.BLOCK)
    if all(a.settled for a in assessments):
        return ReasoningDecision(ReasoningRoute.ALLOW)
    if any(a.failure is not None for a in assessments):
        return ReasoningDecision(ReasoningRoute.REVIEW, ReviewReason.REASONER_FAILED)
    return ReasoningDecision(ReasoningRoute.REVIEW, ReviewReason.EDGE_CASE)
