"""``modpipe policy backtest``: past items replayed through triage and a candidate version, never published.

Items come from ``content.incoming`` between two broker timestamps (:mod:`pipeline.lifecycle.history`) or from a
JSON-lines file of ContentItems. Each is scored by the triage model the workers load and routed exactly as the
triage worker would route it; the candidate judges the items that would have reached the reasoner for its policy
(``all_items``: every item, to measure the text itself). Nothing is published and nothing moves visibility: the
candidate's answers go to the run's folder, and the comparison with what was enforced (the items' standing final
verdicts on ``moderation.verdicts``) is the report shadowing writes too (:mod:`pipeline.lifecycle.compare`).

The run's folder makes it resumable: ``plan.json`` (what is being run), ``results.jsonl`` (one line per item
done, appended as each finishes), then ``report.json``, ``summary.txt`` and ``report.png``. Run it again with the
same arguments and the items already in ``results.jsonl`` are skipped (a crash or Ctrl-C loses at most the items
in flight). At most ``concurrency`` items are judged at once (each one's calls also share the reasoner's
``triton.max_in_flight``). Before any model call, :func:`estimate` says what the run will cost: items, how many
the candidate will judge, calls (first effort, and the worst case with every second look), tokens, and how many
are already in the verdict cache (answers are cached by version, so a rerun or a later promotion reuses them).

The revision of an item read from the topic is the one its escalation names (matched by text) or, for an item
the verdicts know one revision of, that one; an edited item decided by triage alone cannot be told apart and is
counted as not compared.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.codec import decode_content_item
from pipeline.config import Settings
from pipeline.errors import PermanentError
from pipeline.lifecycle.compare import Answer, Pair, compare, enforced_answer, settled_answer, summary
from pipeline.lifecycle.history import Verdicts, escalations_by_item, read_all, read_window
from pipeline.lifecycle.shadow import model_calls
from pipeline.policies import Policy, PolicyLibrary, count_tokens
from pipeline.router import TriageRoute, route_triage
from pipeline.schemas import ContentItem, Escalation, Effort, ReasonerCall, TriageScores
from pipeline.texts import text_hash

logger = logging.getLogger(__name__)

PLAN, RESULTS, REPORT, SUMMARY, PLOT = "plan.json", "results.jsonl", "report.json", "summary.txt", "report.png"


@dataclass(frozen=True)
class Source:
    """Where the items come from: a window of ``content.incoming`` (broker timestamps) or a file."""

    since: datetime | None = None
    until: datetime | None = None
    file: Path | None = None

    def describe(self) -> dict[str, Any]:
        if self.file is not None:
            digest = hashlib.sha256(Path(self.file).read_bytes()).hexdigest()[:16]
            return {"file": str(Path(self.file).resolve()), "sha256": digest}
        return {"topic": "content.incoming", "since": self.since.isoformat() if self.since else None,
                "until": self.until.isoformat() if self.until else None}


@dataclass
class Item:
    key: str  # stable across runs: where the item came from, plus a digest of its bytes
    item: ContentItem
    scores: TriageScores | None = None
    route: str = ""  # allow, block, escalate (triage), or 'all' when every item is judged
    asked: bool = False  # the candidate judges it


@dataclass
class Loaded:
    items: list[Item] = field(default_factory=list)
    unreadable: int = 0


async def load_items(settings: Settings, source: Source) -> Loaded:
    """Every readable item of the source; unreadable ones are counted (the pipeline dead-letters those)."""
    out = Loaded()
    limit = settings.triage.max_text_chars
    if source.file is not None:
        for n, line in enumerate(Path(source.file).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            raw = line.encode("utf-8")
            try:
                item = decode_content_item(raw, limit)
            except PermanentError:
                out.unreadable += 1
                continue
            out.items.append(Item(f"file|{n}|{hashlib.sha256(raw).hexdigest()[:16]}", item))
        return out
    topic = settings.kafka.topic(settings.kafka.incoming_topic)
    async for records in read_window(settings.kafka, topic, source.since, source.until):
        for record in records:
            try:
                item = decode_content_item(record.value, limit, max_bytes=settings.limits.max_message_bytes)
            except PermanentError:
                out.unreadable += 1
                continue
            out.items.append(Item(record.message_id, item))
    return out


def route_items(items: Sequence[Item], scorer: Any, library: PolicyLibrary, candidate: Policy, *,
                all_items: bool = False, batch: int = 64) -> None:
    """Score and route each item as the triage worker would; mark those the candidate judges."""
    enforcing, default = library.enforcing_ids(), library.default_ids()
    pid = candidate.policy_id
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        for entry, scores in zip(chunk, scorer.score([i.item.text for i in chunk]), strict=True):
            entry.scores = scores
            asked = entry.item.policy_ids or []
            wanted = [p for p in asked if p in enforcing] if asked else default
            if asked and not wanted:
                entry.route = "refused"  # no requested policy enforces: the triage worker dead-letters it
                entry.asked = all_items
                continue
            decision = route_triage(scores, scorer.thresholds, wanted,
                                    language=getattr(scores, "language", None) or entry.item.language)
            entry.route = decision.route.value
            shadow_eligible = not candidate.enforcing and (candidate.scope == "default" or pid in asked)
            entry.asked = all_items or (decision.route is TriageRoute.ESCALATE
                                        and (pid in decision.policy_ids or shadow_eligible))


def read_results(path: Path) -> dict[str, dict[str, Any]]:
    """The items a previous run finished (by key); a line cut short by a crash is ignored."""
    done: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[row["key"]] = row
    return done


def prepare(out_dir: Path, plan: dict[str, Any], *, restart: bool = False,
            dry_run: bool = False) -> dict[str, dict[str, Any]]:
    """Create or reuse the run folder; the results already there (empty on a fresh run). A folder that holds
    another run's plan is refused unless ``restart``. ``dry_run`` changes nothing on disk."""
    plan_path, results = out_dir / PLAN, out_dir / RESULTS
    if plan_path.exists() and not restart:
        previous = json.loads(plan_path.read_text())
        if previous == plan:
            return read_results(results)
        if not dry_run:
            raise PermanentError(f"{out_dir} holds another backtest ({previous.get('policy')} "
                                 f"{previous.get('candidate')}, {previous.get('source')}): pass --restart to replace "
                                 "it, or another --out")
    if dry_run:
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (RESULTS, REPORT, SUMMARY, PLOT):
        (out_dir / name).unlink(missing_ok=True)
    plan_path.write_text(json.dumps(plan, indent=2, sort_keys=True) + "\n")
    return {}


async def estimate(items: Sequence[Item], candidate: Policy, reasoner: Any, settings: Settings,
                   done: dict[str, dict[str, Any]], cache: Any | None = None) -> dict[str, Any]:
    """What the run will cost before it spends a model call (see the module docstring)."""
    from pipeline.reasoner.cache import cache_key

    todo = [i for i in items if i.asked and i.key not in done]
    first, escalated = Effort(candidate.first_effort), Effort(candidate.escalated_effort)
    second_look = escalated.rank > first.rank
    always_twice = candidate.high_risk and second_look
    content_tokens = [count_tokens(i.item.text) for i in todo]
    first_input = sum(reasoner.overhead_tokens(candidate, first) + c for c in content_tokens)
    second_input = sum(reasoner.overhead_tokens(candidate, escalated) + c for c in content_tokens) if second_look else 0
    cached = 0
    if cache is not None:
        for entry in todo:
            try:
                if await cache.get(cache_key(entry.item.text, candidate.version, first, reasoner.model)) is not None:
                    cached += 1
            except Exception:  # noqa: BLE001 - the estimate is advice: an unreadable cache counts as empty
                break
    calls_first = len(todo)
    calls_second = len(todo) if second_look else 0
    return {
        "items": len(items),
        "already_done": sum(1 for i in items if i.key in done),
        "candidate_judges": len(todo),
        "triage_routes": dict(sorted(Counter(i.route for i in items).items())),
        "model_calls": {"at_least": max(0, calls_first - cached) + (calls_second if always_twice else 0),
                        "at_most": calls_first + calls_second, "first_effort_cached": cached},
        "input_tokens": {"at_least": first_input + (second_input if always_twice else 0),
                         "at_most": first_input + second_input},
        "output_tokens_at_most": calls_first * settings.reasoner.max_tokens_for(first)
        + calls_second * settings.reasoner.max_tokens_for(escalated),
        "efforts": [first.value] + ([escalated.value] if second_look else []),
        "model": reasoner.model,
    }


@dataclass
class Progress:
    """What the CLI's progress bar shows: items done and model calls spent."""

    done: int = 0
    total: int = 0
    model_calls: int = 0
    callback: Callable[[Progress], None] | None = None

    def step(self, calls: int) -> None:
        self.done += 1
        self.model_calls += calls
        if self.callback is not None:
            self.callback(self)


async def judge_items(items: Sequence[Item], candidate: Policy, reasoner: Any, out_dir: Path,
                      done: dict[str, dict[str, Any]], *, concurrency: int = 4, max_calls: int | None = None,
                      progress: Progress | None = None) -> dict[str, dict[str, Any]]:
    """Judge what is left, at most ``concurrency`` at once, appending each result as it finishes; stops starting
    new items once ``max_calls`` model calls are spent. Returns every result (old and new) by key."""
    results = dict(done)
    todo = [i for i in items if i.key not in done]
    progress = progress or Progress()
    progress.total = len(todo)
    gate = asyncio.Semaphore(concurrency)
    spent = {"calls": 0}
    lock = asyncio.Lock()
    handle = (out_dir / RESULTS).open("a", encoding="utf-8")

    async def one(entry: Item) -> None:
        async with gate:
            if max_calls is not None and spent["calls"] >= max_calls:
                return
            row: dict[str, Any] = {"key": entry.key, "content_id": entry.item.content_id,
                                   "text_hash": text_hash(entry.item.text), "route": entry.route,
                                   "asked": entry.asked}
            calls = 0
            if entry.asked:
                outcome = await reasoner.judge_policies(entry.item, [candidate], triage=entry.scores)
                calls = model_calls(outcome.calls)
                violation, rules = settled_answer(outcome.calls, candidate.policy_id)
                row.update({"violation": violation, "rule_ids": list(rules), "route_candidate": outcome.route.value,
                            "calls": [c.model_dump(mode="json") for c in outcome.calls]})
            async with lock:
                spent["calls"] += calls
                handle.write(json.dumps(row) + "\n")
                handle.flush()
                results[entry.key] = row
                progress.step(calls)

    try:
        await asyncio.gather(*(one(i) for i in todo))
    finally:
        handle.close()
    return results


def _revision(row: dict[str, Any], verdicts: Verdicts, escalations: dict[tuple[str, int], Escalation]) -> int | None:
    cid = row["content_id"]
    revisions = verdicts.revisions(cid)
    for rev in revisions:
        escalation = escalations.get((cid, rev))
        if escalation is not None and text_hash(escalation.item.text) == row["text_hash"]:
            return rev
    return revisions[0] if len(revisions) == 1 else None


def build_report(candidate: Policy, results: dict[str, dict[str, Any]], verdicts: Verdicts,
                 escalations: dict[tuple[str, int], Escalation], *, base_rules: frozenset[str] = frozenset(),
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The comparison report of the judged items against their standing verdicts."""
    pairs: list[Pair] = []
    not_compared: Counter[str] = Counter()
    rules = candidate.rule_ids | base_rules
    for row in results.values():
        if not row.get("asked"):
            not_compared[f"not_asked_triage_{row['route']}"] += 1
            continue
        revision = _revision(row, verdicts, escalations)
        verdict = verdicts.standing(row["content_id"], revision) if revision is not None else None
        if verdict is None:
            not_compared["no_final_verdict" if revision is not None or not verdicts.revisions(row["content_id"])
                         else "revision_unknown"] += 1
            continue
        calls = tuple(ReasonerCall.model_validate(c) for c in row.get("calls", []))
        candidate_answer = Answer(row.get("violation"), tuple(row.get("rule_ids", [])), "candidate",
                                  candidate.version)
        pairs.append(Pair(row["content_id"], revision, candidate_answer,
                          enforced_answer(verdict, candidate.policy_id, rules), calls))
    report = compare(candidate.policy_id, candidate.version, pairs, kind="backtest", not_compared=dict(not_compared))
    judged_calls = [ReasonerCall.model_validate(c) for r in results.values() for c in r.get("calls", [])]
    report["judged"] = sum(1 for r in results.values() if r.get("asked"))
    report["cost"]["model_calls_all_judged"] = model_calls(judged_calls)
    report.update(extra or {})
    return report


async def enforced(settings: Settings, since: datetime | None) -> tuple[Verdicts, dict[tuple[str, int], Escalation]]:
    """The final verdicts and escalations since ``since`` (everything the topics hold when None)."""
    kafka = settings.kafka
    verdicts = Verdicts.from_records(await read_all(kafka, kafka.topic(kafka.verdicts_topic), since))
    escalations = escalations_by_item(await read_all(kafka, kafka.topic(kafka.escalations_topic), since))
    return verdicts, escalations


def write_outputs(out_dir: Path, report: dict[str, Any]) -> dict[str, Path]:
    from pipeline.lifecycle.compare import plot, summary_text

    (out_dir / REPORT).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (out_dir / SUMMARY).write_text(summary_text(report) + "\n")
    return {"report": out_dir / REPORT, "summary": out_dir / SUMMARY, "plot": plot(report, out_dir / PLOT)}


def registry_summary(report: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    tokens = report["cost"]["completion_tokens"]
    calls = report["cost"]["model_calls"]
    return {**summary(report), "path": str(out_dir.resolve()),
            "completion_tokens_per_call": round(tokens / calls, 1) if calls else None}
