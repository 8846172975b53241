"""Request and answer bodies of the gateway (its OpenAPI document is generated from these).

An item sent to the gateway *is* a :class:`~pipeline.schemas.ContentItem` (the wire schema, ``extra="forbid"``)
plus one gateway field, ``edit``; ``platform`` may be left out, and if sent must be the caller's own (the gateway
sets it from the platform token). Answers are plain models; verdicts in them are wire ``Verdict`` objects.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.schemas import ContentItem, Verdict


class SubmitItem(ContentItem):
    """One item as a platform submits it: a ``ContentItem`` (``platform`` comes from the token) plus ``edit``."""

    edit: bool = Field(
        False,
        description="Submit a new text for a content_id you published before: it becomes a new revision, moderated "
        "again (hidden meanwhile if it escalates), and its verdict supersedes the old one. Without it, a known id with "
        "a different text is refused with 409.",
    )

    def content_item(self, platform: str) -> ContentItem:
        """The wire item to publish, owned by ``platform``."""
        return ContentItem.model_validate({**self.model_dump(exclude={"edit"}), "platform": platform})


class ItemBatch(BaseModel):
    """Several items at once (at most ``gateway.max_batch_items``): accepted or refused together."""

    model_config = ConfigDict(extra="forbid")

    items: list[SubmitItem] = Field(..., min_length=1, description="The items, in order.")


class ItemAccepted(BaseModel):
    content_id: str
    status: Literal["accepted", "duplicate", "edit"] = Field(
        ..., description="accepted: new; duplicate: this id with this text was submitted before (nothing new); edit: "
        "a new revision of a known id."
    )
    status_url: str = Field(..., description="Where to ask for the item's decision (GET).")


class ItemsAccepted(BaseModel):
    accepted: int = Field(..., description="New items published.")
    edits: int = Field(..., description="New revisions of known items published.")
    duplicates: int = Field(..., description="Items that were submitted before with the same text.")
    items: list[ItemAccepted]


class ErrorAnswer(BaseModel):
    """Every refusal: a one-line ``error`` plus detail (422 ``fields``, 413 ``limit_bytes``, 429/503
    ``retry_after_s``), never the input."""

    error: str
    fields: list[dict[str, str]] | None = None
    retry_after_s: float | None = None


class Conflict(BaseModel):
    index: int = Field(..., description="Position of the item in the request (0 for a single item).")
    content_id: str
    reason: Literal["edit_without_flag", "id_taken"] = Field(
        ..., description="edit_without_flag: the id is known with another text (send `edit: true` to submit a new "
        "revision); id_taken: the id belongs to another platform."
    )


class ConflictAnswer(BaseModel):
    error: str
    reason: Literal["edit_without_flag", "id_taken"]
    conflicts: list[Conflict]


Decision = Literal["allow", "block", "hidden_pending"]
State = Literal["received", "hidden_pending", "visible", "removed"]


class ItemState(BaseModel):
    """What a platform should do with an item now."""

    content_id: str
    decision: Decision = Field(
        ..., description="allow or block once a final verdict exists; hidden_pending until then (fail closed)."
    )
    state: State = Field(
        ..., description="received: accepted, its latest text not judged yet; hidden_pending: escalated, hidden until "
        "a final verdict; visible / removed: decided."
    )
    final: bool = Field(..., description="Whether the decision is final.")
    revision: int | None = Field(None, description="The revision the decision is about (None before any verdict).")
    verdict: Verdict | None = Field(None, description="The verdict behind the decision (provisional or final).")


class ModerateAnswer(ItemState):
    """``POST /v1/moderate``: the decision when the final verdict came, or at the deadline."""

    timed_out: bool = Field(..., description="The deadline passed before a final verdict.")
    waited_ms: float = Field(..., description="How long the request waited for the verdict.")
    status_url: str = Field(..., description="Where to ask again later (GET).")


# -- OpenAI's moderation API (pipeline.gateway.moderations maps modpipe's verdicts onto it) --------------------------


class TextInput(BaseModel):
    """A text part of a multi-modal moderation input (image parts are not supported)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class ModerationRequest(BaseModel):
    """OpenAI's ``POST /v1/moderations`` body."""

    model_config = ConfigDict(extra="forbid")

    input: str | list[str] | list[TextInput] = Field(
        ..., description="A text, a list of texts, or a list of text parts ({type: text, text})."
    )
    model: str | None = Field(
        None, max_length=128, description="Accepted for compatibility (echoed back); modpipe runs its own pipeline."
    )


class ModpipeResult(BaseModel):
    """modpipe's own view of one result (extra to OpenAI's shape; the SDK keeps unknown fields)."""

    content_id: str
    decision: Decision
    final: bool
    verdict_id: str | None
    timed_out: bool


class ModerationResult(BaseModel):
    flagged: bool = Field(..., description="True unless the final decision is allow (hidden_pending is flagged).")
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[str]]
    modpipe: ModpipeResult


class ModerationResponse(BaseModel):
    id: str
    model: str
    results: list[ModerationResult]


def openapi_body(*schemas: str) -> dict[str, Any]:
    """``openapi_extra`` for a route that parses its JSON body itself (depth-checked before parsing)."""
    refs = [{"$ref": f"#/components/schemas/{name}"} for name in schemas]
    schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


BODY_MODELS: tuple[type[BaseModel], ...] = (SubmitItem, ItemBatch, ModerationRequest)
