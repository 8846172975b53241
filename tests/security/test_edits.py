"""Edits are content: the same content_id with another text is a new revision, moderated again.

The hole (found by an outside tester): a benign text was allowed, then the same id was published with a violent
threat, and nothing happened: no verdict, no dead letter, no log line, the item stayed VISIBLE, because the ledger
was keyed by content_id alone. These tests reproduce it against the handlers and the in-memory store (which keeps
the Redis store's semantics; tests/security/test_keys.py runs the same rules against a real Redis).
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.schemas import ContentItem, Decision, Escalation, Stage, Verdict, VerdictStatus
from pipeline.store import EffectKind, Visibility, item_effect
from pipeline.texts import text_hash
from pipeline.handlers import TriageHandler
from pipeline.triage.fakes import SCRIPTED_THRESHOLDS, ScriptedScorer
from tests.unit.test_handlers import ESCALATIONS, KAFKA, LIB, SCRIPT, Harness, item, triage

pytestmark = pytest.mark.unit


def visibility(h: Harness, cid: str):  # type: ignore[no-untyped-def]
    return asyncio.run(h.store.visibility(cid))


def test_an_edit_to_a_violent_text_is_moderated_again_and_removed() -> None:
    h = Harness()
    triage(h, item("post-1", "good morning everyone"))
    assert visibility(h, "post-1").state is Visibility.VISIBLE
    triage(h, item("post-1", "i will hurt you"))
    first, second = h.verdicts()
    assert (first.revision, first.decision) == (1, Decision.ALLOW)
    assert (second.revision, second.decision, second.status) == (2, Decision.BLOCK, VerdictStatus.FINAL)
    assert second.supersedes == first.verdict_id
    shown = visibility(h, "post-1")
    assert shown.state is Visibility.REMOVED and shown.revision == 2


def test_the_same_text_again_is_a_redelivery_not_a_revision() -> None:
    h = Harness()
    triage(h, item("post-1", "good morning everyone"))
    triage(h, item("post-1", "good  morning everyone "))  # a producer's duplicate: the same text to a reader
    assert [v.revision for v in h.verdicts()] == [1]


def test_a_replayed_older_message_does_not_bring_the_old_text_back() -> None:
    h = Harness()
    (first,) = triage(h, item("post-1", "good morning everyone"))
    triage(h, item("post-1", "i will hurt you"))
    # The very same message (topic, partition, offset, bytes) delivered again: revision 1, already published.
    handler = TriageHandler(ScriptedScorer(SCRIPTED_THRESHOLDS, SCRIPT), LIB, h.effects, max_text_chars=1000)
    asyncio.run(handler.handle_batch([first]))
    assert [v.revision for v in h.verdicts()] == [1, 2]  # nothing new: no third verdict, no new revision
    shown = visibility(h, "post-1")
    assert (shown.state, shown.revision) == (Visibility.REMOVED, 2)  # still the latest revision's state


def test_editing_back_to_an_earlier_text_is_a_new_revision() -> None:
    h = Harness()
    triage(h, item("post-1", "good morning everyone"))
    triage(h, item("post-1", "i will hurt you"))
    triage(h, item("post-1", "good morning everyone"))
    assert [v.revision for v in h.verdicts()] == [1, 2, 3]
    assert visibility(h, "post-1").state is Visibility.VISIBLE


def test_an_edit_that_needs_reasoning_hides_the_item_meanwhile() -> None:
    h = Harness()
    triage(h, item("post-1", "good morning everyone"))
    triage(h, item("post-1", "is this a threat?"))
    provisional = h.verdicts()[-1]
    assert (provisional.revision, provisional.status) == (2, VerdictStatus.PROVISIONAL)
    assert visibility(h, "post-1").state is Visibility.HIDDEN_PENDING
    escalation = Escalation.model_validate_json(h.publisher.on(ESCALATIONS)[-1])
    assert escalation.revision == 2


def test_a_late_verdict_on_an_older_revision_never_moves_visibility() -> None:
    h = Harness()
    triage(h, item("post-1", "is this a threat?"))  # revision 1 escalated, hidden
    triage(h, item("post-1", "good morning everyone"))  # revision 2 allowed at once
    late = Verdict.final("post-1", Decision.BLOCK, Stage.REASONER, revision=1)
    asyncio.run(h.effects.verdict(late))
    shown = visibility(h, "post-1")
    assert (shown.state, shown.revision) == (Visibility.VISIBLE, 2)
    assert asyncio.run(h.store.recorded(EffectKind.FINAL, item_effect("post-1", 1))) is not None


def test_revision_identity_uses_the_normalised_text() -> None:
    assert text_hash("a  b\u200b") == text_hash("a b")
    assert text_hash("A b") != text_hash("a b")
    assert text_hash("lone \ud800 surrogate")  # hostile but valid JSON: hashing never fails


def test_topics_and_models_name_the_revision() -> None:
    assert KAFKA.verdicts_topic and ContentItem(content_id="x", text="t")
    assert Verdict.model_fields["revision"].default == 1 and Escalation.model_fields["revision"].default == 1
