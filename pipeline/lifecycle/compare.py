"""How a policy version's answers compare with what was enforced on the same items: the shadow and backtest report.

Both ``modpipe policy shadow-report`` and ``modpipe policy backtest`` reduce their items to :class:`Pair`s (the
candidate's answer and the enforced one for the same item revision) and write the same report: agreement, flips
each way with examples (ids and the rules each side cited, never the content), the candidate's unsettled answers
(what it would have sent to people), per-rule counts, and the cost in calls and tokens.

An answer counts only when it *settled* (the last call for the policy gave a usable answer that passed every check
the reasoner makes): an answer the pipeline would not have acted on is neither a violation nor a pass. What was
enforced is read from the item's standing final verdict:

* decided by the reasoner: the enforcing version's settled answer for the policy (from the verdict's calls);
* decided by a reviewer: allow is "no violation" of every policy checked; a removal is a violation of the policy
  whose rule the reviewer cited (or of the only policy checked), and says nothing about the others;
* decided by triage: allow is "no violation"; a block is a violation of the policies the verdict names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.router import UNSETTLING
from pipeline.schemas import Decision, ReasonerCall, Stage, Verdict

EXAMPLES = 10


@dataclass(frozen=True)
class Answer:
    """One side's answer about one policy on one item revision."""

    violation: bool | None  # None: unsettled (no usable answer that passed the checks)
    rule_ids: tuple[str, ...] = ()
    source: str = "reasoner"  # who decided: reasoner, review, triage (the candidate side: candidate)
    version: str | None = None  # the policy version behind it, when a version decided


@dataclass(frozen=True)
class Pair:
    content_id: str
    revision: int
    candidate: Answer
    enforced: Answer
    calls: tuple[ReasonerCall, ...] = ()  # the candidate's calls (its cost)


def settled_answer(calls: Iterable[ReasonerCall], policy_id: str) -> tuple[bool | None, tuple[str, ...]]:
    """The settled answer of the last call for ``policy_id`` and the rules it cited; (None, ()) if unsettled."""
    mine = [c for c in calls if c.policy.policy_id == policy_id]
    if not mine:
        return None, ()
    last = mine[-1]
    if last.violation is None or last.error is not None or set(last.escalation_reasons) & UNSETTLING:
        return None, ()
    return bool(last.violation), tuple(last.rule_ids)


def enforced_answer(verdict: Verdict, policy_id: str, policy_rules: frozenset[str] = frozenset()) -> Answer:
    """What the standing final ``verdict`` says about ``policy_id`` (see the module docstring)."""
    ref = next((p for p in verdict.policies if p.policy_id == policy_id), None)
    version = ref.version if ref is not None else None
    blocked = verdict.decision is Decision.BLOCK
    if verdict.stage is Stage.REVIEW:
        if not blocked:
            return Answer(False, (), "review", version)
        cited = tuple(r for r in verdict.rule_ids if r in policy_rules)
        only = len(verdict.policies) == 1 and ref is not None
        return Answer(True if cited or only else None, cited, "review", version)
    if verdict.stage is Stage.TRIAGE:
        if not blocked:
            return Answer(False, (), "triage", version)
        return Answer(True if ref is not None else None, (), "triage", version)
    violation, rules = settled_answer(verdict.reasoner_calls, policy_id)
    if violation is None and not blocked:
        violation = False  # the reasoner allows only when every policy settled "no"
    return Answer(violation, rules, "reasoner", version)


@dataclass
class _Side:
    compared: int = 0
    agree: int = 0
    to_violation: int = 0
    to_allowed: int = 0


@dataclass
class _Examples:
    count: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, pair: Pair, limit: int) -> None:
        self.count += 1
        if len(self.examples) < limit:
            self.examples.append({
                "content_id": pair.content_id, "revision": pair.revision,
                "candidate_rules": list(pair.candidate.rule_ids), "enforced_rules": list(pair.enforced.rule_ids),
                "enforced_by": pair.enforced.source, "enforced_version": pair.enforced.version,
            })

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


def cost(calls: Iterable[ReasonerCall]) -> dict[str, Any]:
    calls = list(calls)
    model = [c for c in calls if not c.cached]
    return {
        "calls": len(calls),
        "model_calls": len(model),
        "cached_calls": len(calls) - len(model),
        "prompt_tokens": sum(c.prompt_tokens or 0 for c in model),
        "completion_tokens": sum(c.completion_tokens or 0 for c in model),
        "by_effort": dict(sorted(Counter(c.effort.value for c in calls).items())),
        "failed_calls": sum(c.error is not None for c in calls),
    }


def compare(policy_id: str, candidate: str, pairs: Sequence[Pair], *, kind: str,
            not_compared: dict[str, int] | None = None, examples: int = EXAMPLES) -> dict[str, Any]:
    """The comparison report (see the module docstring); ``not_compared`` counts items left out, by why."""
    flips_up, flips_down, unsettled = _Examples(), _Examples(), _Examples()
    by_source: dict[str, _Side] = {}
    rules_candidate: Counter[str] = Counter()
    rules_enforced: Counter[str] = Counter()
    up_rules: Counter[str] = Counter()
    down_rules: Counter[str] = Counter()
    versions: Counter[str] = Counter()
    agree = compared = enforced_unsettled = 0
    for pair in pairs:
        c, e = pair.candidate, pair.enforced
        rules_candidate.update(c.rule_ids)
        rules_enforced.update(e.rule_ids)
        if e.version:
            versions[e.version] += 1
        if c.violation is None:
            unsettled.add(pair, examples)
            continue
        if e.violation is None:
            enforced_unsettled += 1
            continue
        side = by_source.setdefault(e.source, _Side())
        side.compared += 1
        compared += 1
        if c.violation == e.violation:
            agree += 1
            side.agree += 1
        elif c.violation:
            flips_up.add(pair, examples)
            side.to_violation += 1
            up_rules.update(c.rule_ids)
        else:
            flips_down.add(pair, examples)
            side.to_allowed += 1
            down_rules.update(e.rule_ids)
    return {
        "kind": kind,
        "policy": policy_id,
        "candidate": candidate,
        "enforced_versions": dict(versions.most_common()),
        "items": len(pairs),
        "compared": compared,
        "agree": agree,
        "agreement": round(agree / compared, 4) if compared else None,
        "flips": {"to_violation": flips_up.as_dict(), "to_allowed": flips_down.as_dict()},
        "candidate_unsettled": unsettled.as_dict(),
        "enforced_unsettled": enforced_unsettled,
        "by_enforced_source": {k: vars(v) for k, v in sorted(by_source.items())},
        "rules": {
            "candidate": dict(rules_candidate.most_common()),
            "enforced": dict(rules_enforced.most_common()),
            "to_violation": dict(up_rules.most_common()),
            "to_allowed": dict(down_rules.most_common()),
        },
        "cost": cost(call for pair in pairs for call in pair.calls),
        "not_compared": dict(sorted((not_compared or {}).items())),
    }


def summary(report: dict[str, Any]) -> dict[str, Any]:
    """What the registry keeps of a report (promotion requires one to exist)."""
    return {
        "kind": report["kind"], "items": report["items"], "compared": report["compared"],
        "agreement": report["agreement"], "to_violation": report["flips"]["to_violation"]["count"],
        "to_allowed": report["flips"]["to_allowed"]["count"],
        "candidate_unsettled": report["candidate_unsettled"]["count"],
        "model_calls": report["cost"]["model_calls"],
    }


def summary_text(report: dict[str, Any]) -> str:
    """The report in a few readable lines (what the CLI prints and writes next to the JSON)."""
    up, down = report["flips"]["to_violation"], report["flips"]["to_allowed"]
    cost_ = report["cost"]
    agreement = f"{report['agreement']:.1%}" if report["agreement"] is not None else "n/a"
    lines = [
        f"{report['kind']} of {report['policy']} {report['candidate']} against what was enforced "
        f"({', '.join(f'{v} x{n}' for v, n in report['enforced_versions'].items()) or 'no versioned verdicts'})",
        f"  items {report['items']}, compared {report['compared']}: agreement {agreement} ({report['agree']} agree)",
        f"  flips to violation {up['count']}, to allowed {down['count']}; candidate unsettled (would go to people) "
        f"{report['candidate_unsettled']['count']}; enforced answer unsettled {report['enforced_unsettled']}",
    ]
    for name, flips in (("to violation", up), ("to allowed", down)):
        for ex in flips["examples"][:5]:
            lines.append(f"    {name}: {ex['content_id']} r{ex['revision']} candidate {ex['candidate_rules'] or '-'}"
                         f" / enforced ({ex['enforced_by']}) {ex['enforced_rules'] or '-'}")
    rules = report["rules"]
    if rules["to_violation"] or rules["to_allowed"]:
        lines.append(f"  rules behind flips: to violation {rules['to_violation']}, to allowed {rules['to_allowed']}")
    lines.append(f"  cost: {cost_['calls']} calls ({cost_['model_calls']} to the model, {cost_['cached_calls']} "
                 f"cached), {cost_['prompt_tokens']} input and {cost_['completion_tokens']} output tokens, by effort "
                 f"{cost_['by_effort']}")
    if report["not_compared"]:
        lines.append(f"  not compared: {report['not_compared']}")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> Path:
    """A PNG: how the compared items split (agree, flips each way, unsettled) and the rules behind the flips."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [1, 1.4]})
    names = ["agree", "to violation", "to allowed", "candidate\nunsettled"]
    values = [report["agree"], report["flips"]["to_violation"]["count"], report["flips"]["to_allowed"]["count"],
              report["candidate_unsettled"]["count"]]
    bars = left.bar(names, values, color=["#4c956c", "#d1495b", "#edae49", "#8d99ae"])
    left.bar_label(bars)
    left.set_title(f"{report['kind']}: {report['policy']} {report['candidate'][:8]}")
    left.set_ylabel("items")
    rules = report["rules"]
    labels = sorted(set(rules["to_violation"]) | set(rules["to_allowed"]))
    if labels:
        xs = range(len(labels))
        right.barh([x + 0.2 for x in xs], [rules["to_violation"].get(r, 0) for r in labels], height=0.4,
                   color="#d1495b", label="to violation (candidate's rule)")
        right.barh([x - 0.2 for x in xs], [rules["to_allowed"].get(r, 0) for r in labels], height=0.4,
                   color="#edae49", label="to allowed (enforced rule)")
        right.set_yticks(list(xs), labels)
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no flips", ha="center", va="center")
        right.set_yticks([])
    right.set_title("rules behind the flips")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
