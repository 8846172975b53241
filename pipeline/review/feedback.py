"""What people's decisions teach the machine: overturn and agreement statistics, and labelled examples for triage.

Plain functions over the audit log (:class:`~pipeline.schemas.ReviewDecision`) and the stored tasks, so they test
without Redis. The export format was agreed with the triage side (``modpipe triage train --feedback``): JSON lines
``{"text", "label": 0|1, "categories": {...} (optional), "policy_id", "rule_id": str|null, "source": "review",
"decided_at": iso}``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pipeline.schemas import Decision, ReviewAction, ReviewDecision, ReviewTask, Verdict


def model_answers(task: ReviewTask) -> dict[str, bool]:
    """The reasoning model's last usable answer per policy (later calls are the higher-effort ones)."""
    answers: dict[str, bool] = {}
    for call in task.reasoner_calls:
        if call.violation is not None:
            answers[call.policy.policy_id] = call.violation
    return answers


def machine_view(task: ReviewTask, superseded: Verdict | None) -> tuple[bool | None, str | None]:
    """What the machine said before a person decided: (violation, source).

    For an appeal it is the verdict being appealed (whatever stage made it); for a first review, the reasoning
    model's answers if it gave any (an item the model failed on has nothing to overturn).
    """
    if superseded is not None:
        return superseded.decision is Decision.BLOCK, superseded.stage.value
    answers = model_answers(task)
    if not answers:
        return None, None
    return any(answers.values()), "reasoner"


def latest_decisions(entries: Iterable[ReviewDecision]) -> dict[str, ReviewDecision]:
    """The last decide entry per content id (an appeal outcome replaces the decision it supersedes)."""
    latest: dict[str, ReviewDecision] = {}
    for entry in entries:
        if entry.action is ReviewAction.DECIDE:
            latest[entry.content_id] = entry
    return latest


def _rate(num: int, den: int) -> float | None:
    return round(num / den, 4) if den else None


def compute_stats(entries: Iterable[ReviewDecision]) -> dict[str, Any]:
    """Overturn rate of machine verdicts (by source) and model/human agreement per policy, from the audit log.

    Every decision counts once (an appeal outcome is a decision of its own, compared with the verdict it
    appealed). Agreement per policy compares the model's answer for a policy with the person's label for it:
    ``remove`` under P labels P violated; ``allow`` labels every policy the model answered as not violated.
    """
    entries = list(entries)
    decisions = [e for e in entries if e.action is ReviewAction.DECIDE]
    by_decision: dict[str, int] = defaultdict(int)
    by_source: dict[str, dict[str, int]] = defaultdict(lambda: {"compared": 0, "overturned": 0})
    agreement: dict[str, dict[str, int]] = defaultdict(lambda: {"compared": 0, "agreed": 0})
    reviewers: dict[str, int] = defaultdict(int)
    for entry in decisions:
        human = entry.decision is Decision.BLOCK
        by_decision["remove" if human else "allow"] += 1
        reviewers[entry.actor_id] += 1
        if entry.model_violation is not None and entry.model_source:
            bucket = by_source[entry.model_source]
            bucket["compared"] += 1
            bucket["overturned"] += int(entry.model_violation != human)
        for policy_id, said in entry.model_answers.items():
            if human and policy_id != entry.policy_id:
                continue  # removed under another policy: says nothing about this one
            label = human and policy_id == entry.policy_id
            agreement[policy_id]["compared"] += 1
            agreement[policy_id]["agreed"] += int(said == label)
    machine = [s for src, s in by_source.items() if src != "review"]
    compared = sum(s["compared"] for s in machine)
    overturned = sum(s["overturned"] for s in machine)
    return {
        "decisions": len(decisions),
        "by_decision": dict(by_decision),
        "escalations": sum(e.action is ReviewAction.ESCALATE for e in entries),
        "appeals": sum(e.action is ReviewAction.APPEAL for e in entries),
        "appeal_outcomes": sum(e.appeal_round > 0 for e in decisions),
        "model_verdicts": {"compared": compared, "overturned": overturned, "overturn_rate": _rate(overturned, compared)},
        "by_source": {
            src: {**s, "overturn_rate": _rate(s["overturned"], s["compared"])} for src, s in sorted(by_source.items())
        },
        "agreement_per_policy": {
            pid: {**a, "rate": _rate(a["agreed"], a["compared"])} for pid, a in sorted(agreement.items())
        },
        "decisions_per_reviewer": dict(sorted(reviewers.items())),
    }


def load_category_policies(model_dir: Path) -> dict[str, str]:
    """Triage category -> policy id, from the triage artefact's thresholds (empty if there is none)."""
    try:
        data = json.loads((Path(model_dir) / "thresholds.json").read_text())
        return {str(k): str(v) for k, v in data.get("category_policies", {}).items()}
    except (OSError, ValueError):
        return {}


def categories_for(entry: ReviewDecision, category_policies: dict[str, str]) -> dict[str, int] | None:
    """Triage category labels implied by a decision, where they are unambiguous.

    ``allow`` under P: every category of P is 0. ``remove`` under P: the category is 1 only when P has exactly one
    (a policy covering several categories, like hate and hate/threatening, leaves the sub-category unknown).
    """
    cats = sorted(c for c, p in category_policies.items() if p == entry.policy_id)
    if not cats:
        return None
    if entry.decision is Decision.ALLOW:
        return {c: 0 for c in cats}
    return {cats[0]: 1} if len(cats) == 1 else None


def feedback_example(entry: ReviewDecision, task: ReviewTask, category_policies: dict[str, str]) -> dict[str, Any]:
    example: dict[str, Any] = {
        "text": task.item.text,
        "label": 1 if entry.decision is Decision.BLOCK else 0,
        "policy_id": entry.policy_id,
        "rule_id": entry.rule_id,
        "source": "review",
        "decided_at": entry.occurred_at.isoformat(),
    }
    categories = categories_for(entry, category_policies)
    if categories is not None:
        example["categories"] = categories
    return example


def validate_example(example: dict[str, Any]) -> None:
    """Raise ValueError unless ``example`` has the agreed export shape."""
    required = {"text": str, "label": int, "policy_id": str, "source": str, "decided_at": str}
    for key, kind in required.items():
        if not isinstance(example.get(key), kind):
            raise ValueError(f"feedback example: {key!r} must be {kind.__name__}")
    if example["label"] not in (0, 1):
        raise ValueError("feedback example: label must be 0 or 1")
    if example.get("rule_id") is not None and not isinstance(example["rule_id"], str):
        raise ValueError("feedback example: rule_id must be a string or null")
    if "categories" in example and not isinstance(example["categories"], dict):
        raise ValueError("feedback example: categories must be an object")
    extra = set(example) - {*required, "rule_id", "categories"}
    if extra:
        raise ValueError(f"feedback example: unexpected keys {sorted(extra)}")
