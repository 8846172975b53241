"""Versioned wire models: everything that crosses a Kafka topic.

Every model forbids unknown fields and carries ``schema_version``. A breaking change gets a new model (``...V2``)
consumed side by side with the old one during a migration; the CHANGELOG calls it out. Datetimes are always
timezone-aware. Content text is untrusted: nothing here logs it.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import uuid
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

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
    TRUNCATED = "truncated"  # the answer was cut off at the output budget or the context, also once more with more
    UNSUPPORTED_FORMAT = "unsupported_format"  # the policy declares an answer format the reasoner cannot read


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
        "contradicts_triage, high_risk_policy, rules_disagree, content_cut, failed); empty when it was.",
    )
    cached: bool = Field(False, description="Served from the verdict cache: no model call was made.")
    completion_tokens: int | None = Field(
        None, ge=0, description="Output tokens of the call: the backend's count when it reports one, else counted here."
    )
    prompt_tokens: int | None = Field(
        None, ge=0, description="Input tokens of the call: the backend's count when it reports one, else counted here."
    )
    tokens_from_backend: bool | None = Field(
        None, description="Whether the token counts are the backend's own (else o200k counts made by modpipe)."
    )
    max_tokens: int | None = Field(None, ge=1, description="Output-token budget the call was sent with.")
    finish_reason: str | None = Field(
        None, description="Why generation stopped, as the backend said it (stop, length, ...), when it said."
    )
    truncation_retries: int = Field(
        0, ge=0, description="Times the call was sent again with a larger budget after a truncated answer."
    )
    verdict_probability: float | None = Field(
        None, ge=0, le=1, description="Probability of a violation from the token log-probabilities of the tokens "
        "that carry the verdict (when the backend returns them); decided on, beside the self-reported confidence.",
    )
    content_cut: str | None = Field(
        None, description="How the content was cut to fit the model's context (kept tokens), when it was."
    )
    escalate: bool = Field(
        False, description="The answer asked for people to decide (the policy's escalation word, e.g. "
        "'INVALID + ESCALATE', or a cited rule the policy marks for escalation).",
    )


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


class _DeadLetterFields(_Wire):
    schema_version: int
    stage: str = Field(..., description="Where it failed: triage, reasoning, review_intake, ...")
    error_type: str = Field(..., description="Exception class, e.g. SchemaError.")
    error: str = Field(..., description="Human-readable reason (never contains the content text).")
    topic: str = Field(..., description="Topic the message came from.")
    partition: int | None = Field(None)
    offset: int | None = Field(None)
    key: str | None = Field(None, description="Message key as base64 (keys are untrusted bytes too).")
    raw_base64: str = Field(..., description="The message value as received, base64-encoded.")
    content_id: str | None = Field(None, description="The content id, when it could be read.")
    attempts: int = Field(1, ge=1, description="How many times processing was tried.")
    occurred_at: AwareDatetime = Field(default_factory=utcnow)


class DeadLetterV1(_DeadLetterFields):
    """Version 1 (the raw bytes always whole, however large), upgraded on read."""

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")


class DeadLetter(_DeadLetterFields):
    """A message the pipeline could not process, on ``moderation.deadletter``: enough to replay or fix it.

    A dead letter must always fit the broker's message limit, so the value and the key it carries are cut to a
    bounded prefix when they are larger; ``raw_length`` and ``raw_sha256`` always describe the whole value, so a
    truncated letter still identifies the message (fetch it from its topic, partition and offset to replay it).
    """

    schema_version: Literal[2] = Field(2, description="Wire version of this model.")
    raw_length: int = Field(..., ge=0, description="Length in bytes of the whole message value.")
    raw_sha256: str = Field(..., description="sha256 (hex) of the whole message value.")
    raw_truncated: bool = Field(False, description="raw_base64 holds only the first bytes of the value.")
    key_length: int | None = Field(None, ge=0, description="Length in bytes of the whole key (None: no key).")
    key_truncated: bool = Field(False, description="key holds only the first bytes of the message key.")

    @model_validator(mode="before")
    @classmethod
    def _describe_whole_raw(cls, data: Any) -> Any:
        """A version-1 letter always carried the whole value: its length and digest follow from it."""
        if isinstance(data, dict) and "raw_length" not in data and isinstance(data.get("raw_base64"), str):
            try:
                raw = base64.b64decode(data["raw_base64"], validate=True)
            except (ValueError, binascii.Error):
                return data
            key = data.get("key")
            key_length = None
            if isinstance(key, str):
                try:
                    key_length = len(base64.b64decode(key, validate=True))
                except (ValueError, binascii.Error):
                    key_length = None
            data = {**data, "raw_length": len(raw), "raw_sha256": hashlib.sha256(raw).hexdigest(),
                    "key_length": key_length}
        return data


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


class WebhookEvent(str, enum.Enum):
    """What a webhook delivery announces."""

    FINAL = "verdict.final"  # the first final verdict on an item revision
    SUPERSEDING = "verdict.superseding"  # a final verdict that replaces an earlier one (an appeal, an edit's verdict)


class WebhookDelivery(_Wire):
    """Body of a webhook POST to a platform's callback URL: one final verdict on one of its items.

    ``delivery_id`` is the receiver's idempotency key: every attempt, redelivery and replay of the same verdict to
    the same platform carries the same id. Deliveries for one content id arrive in the order the verdicts were
    published; apply the one with the highest ``revision`` (and, within it, the one that supersedes the other).
    """

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")
    delivery_id: str = Field(..., description="Stable id of this delivery (identical on every attempt and replay).")
    event: WebhookEvent = Field(..., description="verdict.final, or verdict.superseding when it replaces another.")
    platform: str = Field(..., max_length=64, description="The platform the item belongs to (Verdict.platform).")
    content_id: str = Field(..., pattern=CONTENT_ID_PATTERN)
    revision: int = Field(..., ge=1, description="The item revision the verdict judged.")
    decision: Decision = Field(..., description="allow or block.")
    supersedes: str | None = Field(None, description="verdict_id of the verdict this one replaces, if any.")
    verdict: Verdict = Field(..., description="The verdict with its evidence (never show `analysis` to end users).")


class ShadowResult(_Wire):
    """What a candidate policy version (or a policy that is not enforcing) would have said about an item the
    reasoning role judged for real, on ``moderation.shadow`` (key: ``content_id``). Never enforced: no verdict,
    visibility or review task follows from it.

    Carries the same evidence as a verdict (every reasoner call, cited rules, rationale, triage scores) next to
    what enforcement did with the item, so a report can compare the two on the same items. ``shadow_id`` is the
    idempotency key: a shadow judgement repeated for the same item revision and version has the same id.
    """

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")
    shadow_id: str = Field(..., description="Stable id: one per (content_id, revision, policy, version).")
    content_id: str = Field(..., pattern=CONTENT_ID_PATTERN)
    revision: int = Field(1, ge=1, description="The revision of the item judged (see Verdict.revision).")
    platform: str | None = Field(None, max_length=64, description="The item's platform (ContentItem.platform).")
    policy: PolicyRef = Field(..., description="The version judged in shadow.")
    enforced_policy: PolicyRef | None = Field(
        None, description="The version of the same policy that was enforcing on this item (None: the policy is "
        "not enforcing at all, or the item was not judged against it)."
    )
    decision: Decision | None = Field(
        None, description="What the shadowed version alone would have decided: allow or block; None when it would "
        "have sent the item to people (unsure at the top effort, an escalating rule, a failed call)."
    )
    review_reason: ReviewReason | None = Field(None, description="Why it would have gone to people, if it would.")
    violation: bool | None = Field(
        None, description="The shadowed version's answer when it settled (a usable answer that passed every check); "
        "None when it stayed unsure or failed."
    )
    rule_ids: list[str] = Field(default_factory=list, description="Rule ids it cited, all defined by that version.")
    rationale: str = Field("", description="Why, in words (the deciding calls' rationales).")
    reasoner_calls: list[ReasonerCall] = Field(default_factory=list, description="Every call made in shadow.")
    triage: TriageScores | None = Field(None, description="The item's triage scores (from the escalation).")
    enforced_decision: Decision | None = Field(
        None, description="What enforcement decided: allow or block; None when the item went to review."
    )
    enforced_violation: bool | None = Field(
        None, description="The enforcing version's settled answer for this policy on the item (None: it did not "
        "settle, or the policy is not enforcing)."
    )
    enforced_rule_ids: list[str] = Field(
        default_factory=list, description="Rule ids the enforcing version cited for this policy."
    )
    verdict_id: str | None = Field(None, description="The final verdict enforcement published, if it published one.")
    latency_ms: float = Field(0.0, ge=0, description="Time the shadow judgement took.")
    decided_at: AwareDatetime = Field(default_factory=utcnow)


class PolicyAction(str, enum.Enum):
    """What a policy author did to a policy's lifecycle (the audit log records every one)."""

    SHADOW_START = "shadow_start"  # a candidate version is judged on live traffic, never enforced
    SHADOW_STOP = "shadow_stop"
    PROMOTE = "promote"  # a candidate version became the enforcing one
    ROLLBACK = "rollback"  # the version enforcing before the last promotion enforces again
    RETROACT_START = "retroact_start"  # a retroaction run began (what it will look at)
    RETROACT_ITEM = "retroact_item"  # one item re-judged under the enforcing version, and what came of it
    RETROACT_END = "retroact_end"  # a retroaction run ended (counts, budget spent)


class PolicyAudit(_Wire):
    """One entry of the policy lifecycle's audit log, on ``moderation.decisions`` beside the reviewers' entries
    (key: the content id for a retroaction item, else the policy id). ``entry = "policy"`` tells it from a
    :class:`ReviewDecision` (read both with :func:`read_audit`). Carries who did what and why, never content.

    ``audit_id`` is the idempotency key: a republished entry has the same id, and a retroaction item's entry is
    the same whichever run re-judged the item.
    """

    schema_version: Literal[1] = Field(1, description="Wire version of this model.")
    entry: Literal["policy"] = Field("policy", description="Always 'policy': tells this from a ReviewDecision.")
    audit_id: str = Field(..., description="Stable id of this audit entry.")
    action: PolicyAction
    policy_id: str = Field(..., description="The policy acted on.")
    version: str = Field(..., description="The version acted on: shadowed, promoted, rolled back to, or the "
                         "enforcing version a retroaction re-judged under.")
    previous_version: str | None = Field(
        None, description="The version enforcing before a promotion or rollback; for a retroaction item, the "
        "version the superseded verdict was decided under."
    )
    actor_id: str = Field(..., description="Who acted (the policy author or operator).")
    reason: str = Field("", max_length=2000, description="Why, in the actor's words.")
    run_id: str | None = Field(None, description="The retroaction run, for retroaction entries.")
    content_id: str | None = Field(None, pattern=CONTENT_ID_PATTERN, description="The item, for retroact_item.")
    revision: int | None = Field(None, ge=1, description="The item revision, for retroact_item.")
    outcome: str | None = Field(
        None, description="For retroact_item: published (a superseding verdict), unchanged, unsettled (the "
        "enforcing version would send it to people: the standing verdict stays), skipped_reviewed, "
        "skipped_superseded, skipped_in_review, failed."
    )
    decision: Decision | None = Field(None, description="The decision the superseding verdict carries.")
    previous_decision: Decision | None = Field(None, description="The decision of the verdict it supersedes.")
    verdict_id: str | None = Field(None, description="The superseding final verdict published, if any.")
    supersedes: str | None = Field(None, description="The verdict it supersedes (or re-judged), if any.")
    evidence: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="What the action relied on or produced: the golden-set accuracy and the "
        "bar, the report that exists for the version, a run's counts and model calls."
    )
    occurred_at: AwareDatetime = Field(default_factory=utcnow)


WIRE_MODELS["ReviewDecision"] = ReviewDecision
WIRE_MODELS["AppealRequest"] = AppealRequest
WIRE_MODELS["WebhookDelivery"] = WebhookDelivery
WIRE_MODELS["ShadowResult"] = ShadowResult
WIRE_MODELS["PolicyAudit"] = PolicyAudit


# Older versions each current model still reads (side by side during a migration), upgraded on read. Every v1 -> v2
# upgrade is the same: v2 added ``revision``, and what v1 described was the item's first revision (DeadLetter v2
# instead added the whole value's length and digest, which its validator derives from a v1 letter's bytes).
LEGACY_VERSIONS: dict[type[_Wire], dict[int, type[_Wire]]] = {
    Verdict: {1: VerdictV1},
    Escalation: {1: EscalationV1},
    ReviewTask: {1: ReviewTaskV1},
    ReviewDecision: {1: ReviewDecisionV1},
    DeadLetter: {1: DeadLetterV1},
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
            first_revision = {"revision": 1} if "revision" in model.model_fields else {}
            return model.model_validate({**old, "schema_version": model.model_fields["schema_version"].default,
                                         **first_revision})
    return model.model_validate(data)


def parse_wire(model: type[WireT], raw: str | bytes) -> WireT:
    """:func:`validate_wire` from JSON text (what the stores and topics hold)."""
    return validate_wire(model, json.loads(raw))


def is_policy_audit(data: Any) -> bool:
    """True for a :class:`PolicyAudit` entry of ``moderation.decisions`` (decoded JSON, JSON text or a model)."""
    if isinstance(data, PolicyAudit):
        return True
    if isinstance(data, (bytes, str)):
        try:
            data = json.loads(data)
        except ValueError:
            return False
    return isinstance(data, dict) and data.get("entry") == "policy"


def read_audit(raw: str | bytes | dict) -> ReviewDecision | PolicyAudit:
    """An entry of ``moderation.decisions``: a reviewer's :class:`ReviewDecision` (any version) or a
    :class:`PolicyAudit`. Raises pydantic's ValidationError for anything else."""
    data = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    if is_policy_audit(data):
        return PolicyAudit.model_validate(data)
    return validate_wire(ReviewDecision, data)
