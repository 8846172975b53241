"""Versioned wire models: everything that crosses a Kafka topic.

Every model forbids unknown fields and carries ``schema_version``. A breaking change gets a new model (``...V2``)
consumed side by side with the old one during a migration; the CHANGELOG calls it out. Datetimes are always
timezone-aware. Content text is untrusted: nothing here logs it.
"""

from __future__ import annotations

import enum
import json
import uuid
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

CONTENT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class Decision(str, enum.Enum):
    """What a platform should do with an item."""

    ALLOW = "allow"  # show it
    BLOCK = "block"  # remove it
    HIDE_PENDING = "hide_pending"  # hidden until a final verdict (provisional verdicts only)


class Stage(str, enum.Enum):
    """Which part of the pipeline produced a verdict."""

    TRIAGE = "triage"
    REASONER = "reasoner"
    REVIEW = "review"


class VerdictStatus(str, enum.Enum):
    PROVISIONAL = "provisional"
    FINAL = "final"


class Effort(str, enum.Enum):
    """Reasoning effort, as gpt-oss-safeguard's system message names it (``Reasoning: low``)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"

    @property
    def rank(self) -> int:
        """0 (low) to 2 (high): efforts compare by rank, never by name."""
        return ("low", "medium", "high").index(self.value)


class CallFailure(str, enum.Enum):
    """Why a reasoning call gave no usable answer."""

    UNAVAILABLE = "unavailable"  # the model server could not be reached or had no such model (after retries)
    TIMEOUT = "timeout"  # no answer within the deadline (after retries)
    INVALID_OUTPUT = "invalid_output"  # the server answered, but not with a readable verdict


TRANSPORT_FAILURES = frozenset({CallFailure.UNAVAILABLE, CallFailure.TIMEOUT})


class ContentItem(_Wire):
    """A piece of user content, published by a producer to ``content.incoming`` (key: ``content_id``)."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")
    content_id: str = Field(..., pattern=CONTENT_ID_PATTERN, description="The producer's stable id for the item.")
    text: str = Field(..., description="The user content. Untrusted; never logged above DEBUG.")
    author_id: str | None = Field(None, max_length=128, description="Opaque id of the author, if known.")
    platform: str | None = Field(None, max_length=64, description="Which surface the item came from.")
    language: str | None = Field(None, max_length=16, description="BCP-47 language tag, if known.")
    policy_ids: list[str] | None = Field(
        None, description="Policies to judge the item against; None means every enforcing policy."
    )
    created_at: AwareDatetime = Field(default_factory=utcnow, description="When the producer created the item.")


class TriageScores(_Wire):
    """What the triage classifier said about an item."""

    model_version: str = Field(..., description="Content hash of the triage artefact that scored the item.")
    violation: float = Field(..., ge=0, le=1, description="Calibrated probability that any policy is violated.")
    categories: dict[str, float] = Field(
        default_factory=dict, description="Per-category probabilities (category code -> probability)."
    )
    latency_ms: float = Field(..., ge=0, description="Embedding plus scoring time for the item's batch.")


class PolicyRef(_Wire):
    """Which version of which policy a decision was made against."""

    policy_id: str = Field(..., description="Policy folder name, e.g. 'hate'.")
    version: str = Field(..., description="Author-assigned version from the policy metadata.")
    content_hash: str = Field(..., description="sha256 (first 16 hex) of the policy text the model read.")


class ReasonerCall(_Wire):
    """One generate call to the reasoning model, as evidence."""

    policy: PolicyRef
    model: str = Field(..., description="Triton model name that answered.")
    effort: Effort = Field(..., description="Reasoning effort requested.")
    violation: bool | None = Field(None, description="The model's answer; None when the output was unusable.")
    confidence: float | None = Field(None, ge=0, le=1, description="Self-reported confidence (not a probability).")
    rule_ids: list[str] = Field(default_factory=list, description="Rule ids cited, checked against the policy.")
    invalid_rule_ids: list[str] = Field(
        default_factory=list, description="Rule ids the model cited that the policy does not define."
    )
    rationale: str = Field("", description="The model's short rationale (final channel).")
    error: str | None = Field(None, description="Why the call failed or its output was unusable.")
    failure: CallFailure | None = Field(None, description="The kind of failure, when ``error`` is set.")
    latency_ms: float = Field(..., ge=0)
    policy_category: str | None = Field(
        None, description="The deciding rule id the model named (checked against the policy like rule_ids)."
    )
    analysis: str = Field(
        "",
        description="The model's chain of thought (analysis channel), size-capped. Evidence for reviewers and "
        "audits only: never show it to end users.",
    )
    output_errors: list[str] = Field(
        default_factory=list, description="Where the final answer broke the strict answer schema (still readable)."
    )
    escalation_reasons: list[str] = Field(
        default_factory=list,
        description="Why this answer was not accepted as final (low_confidence, invalid_output, unknown_rules, "
        "contradicts_triage, high_risk_policy, rules_disagree); empty when it was.",
    )
    cached: bool = Field(False, description="Served from the verdict cache: no model call was made.")
    completion_tokens: int | None = Field(None, ge=0, description="Tokens the model generated, when known.")


class Latency(_Wire):
    triage_ms: float | None = Field(None, ge=0, description="Triage embedding + scoring time.")
    reasoner_ms: float | None = Field(None, ge=0, description="Sum of reasoning call times.")
    since_ingest_ms: float | None = Field(
        None, description="From the item's arrival on content.incoming (broker timestamp) to this verdict."
    )


class _VerdictFields(_Wire):
    schema_version: int
    verdict_id: str = Field(..., description="Stable id; identical for redelivered copies.")
    content_id: str = Field(..., pattern=CONTENT_ID_PATTERN)
    status: VerdictStatus = Field(..., description="provisional (item hidden meanwhile) or final.")
    decision: Decision
    stage: Stage = Field(..., description="The stage that decided.")
    triage: TriageScores | None = Field(None, description="Triage evidence, when triage ran.")
    policies: list[PolicyRef] = Field(default_factory=list, description="Policies the decision was made against.")
    reasoner_calls: list[ReasonerCall] = Field(default_factory=list, description="Every reasoning call made.")
    rule_ids: list[str] = Field(default_factory=list, description="Cited rule ids, all defined by the policies.")
    rationale: str = Field("", description="Why, in words.")
    reviewer_id: str | None = Field(None, description="Who decided, for stage=review.")
    supersedes: str | None = Field(
        None, description="verdict_id of the final verdict this one replaces (an appeal outcome, or the verdict on "
        "an earlier revision of the item), if any."
    )
    latency: Latency = Field(default_factory=Latency)
    decided_at: AwareDatetime = Field(default_factory=utcnow)


class VerdictV1(_VerdictFields):
    """Version 1 (before revisions): read from topics and stores written by older workers, upgraded on read."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")


class Verdict(_VerdictFields):
    """A decision about one revision of one item, published to ``moderation.verdicts`` (key: ``content_id``).

    Consumers must treat ``verdict_id`` as the idempotency key: a redelivered verdict has the same id. At most one
    final verdict id exists per ``(content_id, revision)``; a later appeal, or the verdict on a newer revision (an
    edit), is a new verdict naming the one it replaces in ``supersedes``. What a platform shows follows the verdict
    of the highest revision.
    """

    schema_version: Literal[2] = Field(2, description="Wire version of this model.")
    revision: int = Field(
        1, ge=1, description="Which text of the item this verdict judged: 1 for the first, +1 for each edit (the same "
        "content_id published with a different text)."
    )
    platform: str | None = Field(
        None, max_length=64, description="The item's platform (ContentItem.platform): whose item this is."
    )

    @classmethod
    def final(cls, content_id: str, decision: Decision, stage: Stage, **evidence: Any) -> Verdict:
        """A new final verdict (fresh ``verdict_id``); ``evidence`` fills the other fields."""
        return cls(verdict_id=uuid.uuid4().hex, content_id=content_id, status=VerdictStatus.FINAL,
                   decision=decision, stage=stage, **evidence)

    @classmethod
    def provisional(cls, content_id: str, stage: Stage, **evidence: Any) -> Verdict:
        """A new provisional verdict: the item is hidden until a final one."""
        return cls(verdict_id=uuid.uuid4().hex, content_id=content_id, status=VerdictStatus.PROVISIONAL,
                   decision=Decision.HIDE_PENDING, stage=stage, **evidence)


class EscalationReason(str, enum.Enum):
    AMBIGUOUS = "ambiguous"  # triage score inside the escalation band
    HIGH_RISK = "high_risk"  # a high-risk category is forced to the reasoner


class _EscalationFields(_Wire):
    schema_version: int
    item: ContentItem
    triage: TriageScores
    reason: EscalationReason
    policy_ids: list[str] = Field(..., min_length=1, description="Policies the reasoner must check.")
    ingested_at: AwareDatetime = Field(..., description="Broker timestamp of the item on content.incoming.")
    escalated_at: AwareDatetime = Field(default_factory=utcnow)


class EscalationV1(_EscalationFields):
    """Version 1 (before revisions), upgraded on read."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")


class Escalation(_EscalationFields):
    """An item triage could not settle, sent to ``moderation.escalations`` (key: ``content_id``)."""

    schema_version: Literal[2] = Field(2, description="Wire version of this model.")
    revision: int = Field(1, ge=1, description="The revision of the item (see Verdict.revision).")


class ReviewReason(str, enum.Enum):
    EDGE_CASE = "edge_case"  # the model stayed unsure at the highest effort
    REASONER_FAILED = "reasoner_failed"  # the model was down or its output unusable after retries
    POLICY_ESCALATE = "policy_escalate"  # a high-risk policy says humans decide
    APPEAL = "appeal"  # a decided item was appealed (created by the review service, never on the review topic)


class _ReviewTaskFields(_Wire):
    schema_version: int
    task_id: str = Field(..., description="Stable id; identical for redelivered copies.")
    item: ContentItem
    triage: TriageScores
    reason: ReviewReason
    policy_ids: list[str] = Field(..., min_length=1)
    reasoner_calls: list[ReasonerCall] = Field(default_factory=list, description="What the model said, if anything.")
    ingested_at: AwareDatetime
    created_at: AwareDatetime = Field(default_factory=utcnow)


class ReviewTaskV1(_ReviewTaskFields):
    """Version 1 (before revisions), upgraded on read."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")


class ReviewTask(_ReviewTaskFields):
    """A job for a human reviewer, on ``moderation.review`` (key: ``content_id``)."""

    schema_version: Literal[2] = Field(2, description="Wire version of this model.")
    revision: int = Field(1, ge=1, description="The revision of the item under review (see Verdict.revision).")


class DeadLetter(_Wire):
    """A message the pipeline could not process, on ``moderation.deadletter``: enough to replay or fix it."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")
    stage: str = Field(..., description="Where it failed: triage, reasoning, review_intake, ...")
    error_type: str = Field(..., description="Exception class, e.g. SchemaError.")
    error: str = Field(..., description="Human-readable reason (never contains the content text).")
    topic: str = Field(..., description="Topic the message came from.")
    partition: int | None = Field(None)
    offset: int | None = Field(None)
    key: str | None = Field(None, description="Message key as base64 (keys are untrusted bytes too).")
    raw_base64: str = Field(..., description="The message value exactly as received, base64-encoded.")
    content_id: str | None = Field(None, description="The content id, when it could be read.")
    attempts: int = Field(1, ge=1, description="How many times processing was tried.")
    occurred_at: AwareDatetime = Field(default_factory=utcnow)


WIRE_MODELS: dict[str, type[_Wire]] = {
    "ContentItem": ContentItem,
    "Verdict": Verdict,
    "Escalation": Escalation,
    "ReviewTask": ReviewTask,
    "DeadLetter": DeadLetter,
}


class ReviewAction(str, enum.Enum):
    """What a person did to a review task (the audit log records every one)."""

    DECIDE = "decide"  # allow or remove: a final verdict was published
    ESCALATE = "escalate"  # handed to the admin queue
    APPEAL = "appeal"  # a decided item was re-queued for a second look


class _ReviewDecisionFields(_Wire):
    schema_version: int
    decision_id: str = Field(..., description="Stable id of this audit entry.")
    content_id: str = Field(..., pattern=CONTENT_ID_PATTERN)
    task_id: str = Field(..., description="The review task acted on.")
    action: ReviewAction
    actor_id: str = Field(..., description="The reviewer, admin or platform that acted.")
    actor_role: str = Field(..., description="reviewer, admin or platform.")
    decision: Decision | None = Field(None, description="allow or block, for action=decide.")
    policy_id: str | None = Field(None, description="Policy the decision was made under.")
    rule_id: str | None = Field(None, description="Rule of that policy the reviewer cited.")
    note: str = Field("", max_length=2000, description="The actor's note (reviewers must not paste content here).")
    verdict_id: str | None = Field(None, description="The final verdict this decision published.")
    supersedes: str | None = Field(None, description="The verdict an appeal outcome replaces.")
    appeal_round: int = Field(0, ge=0, description="0 for a first review, n for the n-th appeal.")
    model_violation: bool | None = Field(
        None, description="What the machine said before this decision (any policy violated), if it said anything."
    )
    model_source: str | None = Field(
        None, description="Which verdict model_violation comes from: reasoner (its answers) or, for an appeal, the "
        "stage of the superseded verdict (triage, reasoner, review)."
    )
    model_answers: dict[str, bool] = Field(
        default_factory=dict, description="The reasoning model's last usable answer per policy (policy id -> violation)."
    )
    occurred_at: AwareDatetime = Field(default_factory=utcnow)


class ReviewDecisionV1(_ReviewDecisionFields):
    """Version 1 (before revisions), upgraded on read."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")


class ReviewDecision(_ReviewDecisionFields):
    """One entry of the reviewers' audit log, on ``moderation.decisions`` (key: ``content_id``).

    Carries who did what and why, never the content text. ``decision_id`` is the idempotency key: a republished
    entry has the same id.
    """

    schema_version: Literal[2] = Field(2, description="Wire version of this model.")
    revision: int = Field(1, ge=1, description="The revision of the item the actor judged (see Verdict.revision).")


class AppealRequest(_Wire):
    """Body of ``POST /v1/appeals``: ask people to look again at a decided item."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")
    content_id: str = Field(..., pattern=CONTENT_ID_PATTERN)
    reason: str = Field("", max_length=2000, description="Why the author or platform appeals.")
    item: ContentItem | None = Field(
        None, description="The item itself; required when the pipeline decided it without review (no stored copy)."
    )


WIRE_MODELS["ReviewDecision"] = ReviewDecision
WIRE_MODELS["AppealRequest"] = AppealRequest


# Older versions each current model still reads (side by side during a migration), upgraded on read. Every v1 -> v2
# upgrade is the same: v2 added ``revision``, and what v1 described was the item's first revision.
LEGACY_VERSIONS: dict[type[_Wire], dict[int, type[_Wire]]] = {
    Verdict: {1: VerdictV1},
    Escalation: {1: EscalationV1},
    ReviewTask: {1: ReviewTaskV1},
    ReviewDecision: {1: ReviewDecisionV1},
}
WireT = TypeVar("WireT", bound=_Wire)


def validate_wire(model: type[WireT], data: Any) -> WireT:
    """``model`` from decoded JSON, reading an older ``schema_version`` through its legacy model and upgrading it.

    Raises pydantic's ValidationError like ``model.model_validate``.
    """
    if isinstance(data, dict):
        legacy = LEGACY_VERSIONS.get(model, {}).get(data.get("schema_version"))  # type: ignore[arg-type]
        if legacy is not None:
            old = legacy.model_validate(data).model_dump()
            return model.model_validate({**old, "schema_version": model.model_fields["schema_version"].default,
                                         "revision": 1})
    return model.model_validate(data)


def parse_wire(model: type[WireT], raw: str | bytes) -> WireT:
    """:func:`validate_wire` from JSON text (what the stores and topics hold)."""
    return validate_wire(model, json.loads(raw))
