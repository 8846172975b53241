"""Review logic that needs no services: queue choice, statistics, the feedback format, tokens, the bench report."""

from __future__ import annotations

import json

import pytest

from pipeline.review.auth import Principal, Role, new_token, token_hash
from pipeline.harness.bench.review import BEGIN, END, write_markdown
from pipeline.review.feedback import (
    categories_for,
    compute_stats,
    feedback_example,
    latest_decisions,
    machine_view,
    validate_example,
)
from pipeline.review.queue import queue_for
from pipeline.harness.review import sample_task
from pipeline.schemas import Decision, ReviewAction, ReviewDecision, Stage, Verdict, VerdictStatus

pytestmark = pytest.mark.unit

SEVERITIES = {"hate": "high", "self_harm": "critical", "sexual": "medium"}


def entry(cid: str, decision: Decision | None, *, policy: str = "hate", model: bool | None = None,
          source: str | None = "reasoner", answers: dict[str, bool] | None = None, round_: int = 0,
          action: ReviewAction = ReviewAction.DECIDE, rule: str | None = None) -> ReviewDecision:
    return ReviewDecision(decision_id=f"d-{cid}-{round_}", content_id=cid, task_id="t", action=action, actor_id="alice",
                          actor_role="reviewer", decision=decision, policy_id=policy, rule_id=rule,
                          model_violation=model, model_source=source if model is not None else None,
                          model_answers=answers or {}, appeal_round=round_)


def test_queue_is_the_most_severe_policy_of_the_task() -> None:
    assert queue_for(sample_task("a", policy_ids=("sexual", "self_harm", "hate")), SEVERITIES) == "critical:self_harm"
    assert queue_for(sample_task("b", policy_ids=("sexual",)), SEVERITIES) == "medium:sexual"
    assert queue_for(sample_task("c", policy_ids=("unknown",)), SEVERITIES) == "medium:unknown"


def test_machine_view_prefers_the_appealed_verdict_over_model_answers() -> None:
    task = sample_task("a", model_says=True)
    assert machine_view(task, None) == (True, "reasoner")
    assert machine_view(sample_task("b", model_says=None), None) == (None, None)  # the model failed: no verdict
    appealed = Verdict(verdict_id="v", content_id="a", status=VerdictStatus.FINAL, decision=Decision.ALLOW,
                       stage=Stage.TRIAGE)
    assert machine_view(task, appealed) == (False, "triage")


def test_stats_count_overturns_by_source_and_agreement_per_policy() -> None:
    entries = [
        entry("1", Decision.BLOCK, model=True, answers={"hate": True}),  # agree
        entry("2", Decision.ALLOW, model=True, answers={"hate": True, "violence": False}),  # overturn
        entry("3", Decision.BLOCK, policy="violence", model=True, answers={"hate": True}),  # hate: no label
        entry("4", Decision.ALLOW, model=True, source="triage"),  # appeal of a triage block: overturned
        entry("5", Decision.BLOCK, model=True, source="review", round_=1),  # appeal of a person: not a machine
        entry("6", None, action=ReviewAction.ESCALATE),
    ]
    stats = compute_stats(entries)
    assert stats["decisions"] == 5 and stats["escalations"] == 1 and stats["appeal_outcomes"] == 1
    assert stats["by_source"]["reasoner"] == {"compared": 3, "overturned": 1, "overturn_rate": 0.3333}
    assert stats["by_source"]["triage"]["overturned"] == 1
    assert stats["model_verdicts"] == {"compared": 4, "overturned": 2, "overturn_rate": 0.5}
    assert stats["agreement_per_policy"]["hate"] == {"compared": 2, "agreed": 1, "rate": 0.5}
    assert stats["agreement_per_policy"]["violence"] == {"compared": 1, "agreed": 1, "rate": 1.0}


def test_latest_decision_per_item_wins_for_export() -> None:
    first, second = entry("x", Decision.BLOCK), entry("x", Decision.ALLOW, round_=1)
    assert latest_decisions([first, entry("x", None, action=ReviewAction.APPEAL), second])["x"] is second


def test_feedback_example_has_the_agreed_shape() -> None:
    cats = {"H": "hate", "H2": "hate", "HR": "harassment"}
    task = sample_task("a", text="some text")
    removed = feedback_example(entry("a", Decision.BLOCK, rule="HT1.b"), task, cats)
    validate_example(removed)
    assert removed == {"text": "some text", "label": 1, "policy_id": "hate", "rule_id": "HT1.b", "source": "review",
                       "decided_at": removed["decided_at"]}  # hate has two categories: which one is unknown
    allowed = feedback_example(entry("a", Decision.ALLOW), task, cats)
    assert allowed["label"] == 0 and allowed["rule_id"] is None and allowed["categories"] == {"H": 0, "H2": 0}
    harassment = entry("a", Decision.BLOCK, policy="harassment", rule="HR1.a")
    assert categories_for(harassment, cats) == {"HR": 1}
    json.dumps(allowed)  # JSON-serialisable as is
    with pytest.raises(ValueError):
        validate_example({**allowed, "label": 2})
    with pytest.raises(ValueError):
        validate_example({**allowed, "extra": 1})


def test_tokens_are_random_and_hashes_do_not_reveal_them() -> None:
    a, b = new_token(), new_token()
    assert a != b and a.startswith("mpr_") and len(a) > 40
    assert token_hash(a) != token_hash(b) and a not in token_hash(a) and len(token_hash(a)) == 64
    assert Principal("x", Role.ADMIN).can_review and not Principal("p", Role.PLATFORM).can_review


def test_bench_markdown_replaces_only_its_section(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "BENCHMARKS.md"
    path.write_text("# Benchmarks\n\n<!-- bench:spine:begin -->\nspine numbers\n<!-- bench:spine:end -->\n")
    report = {"measured_at": "now", "machine": "m", "reviewers": 50, "items": 2000, "decided": 2000, "audited": 2000,
              "double_assigned": 0, "lost": 0, "claim_latency_ms": {"p50": 1.0, "p99": 2.0},
              "decide_latency_ms": {"p50": 3.0, "p99": 4.0}, "decisions_per_s": 100.0, "errors": {}}
    write_markdown(report, path)
    write_markdown({**report, "decided": 1999}, path)
    text = path.read_text()
    assert "spine numbers" in text and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "1999 of 2000" in text and "2000 of 2000" not in text
