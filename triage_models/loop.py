"""The learning loop: the pipeline's own final verdicts become labelled rows, and a retrained triage is promoted
only when it beats the one in service on rows it never saw.

Where the labels come from (every row keeps its provenance: source, verdict or decision id, the policy versions
that produced it, the triage model that escalated it, when it was decided):

* ``moderation.verdicts`` (``Verdict`` v2): final verdicts of ``stage=reasoner`` label an item with the reasoning
  model's decision, kept only when every deciding call reported ``confidence >= min_confidence`` (a self-report,
  not a probability, so the bar is conservative). Triage-stage verdicts are *never* labels: training on the
  classifier's own automatic decisions would only teach it its mistakes more firmly.
* ``moderation.decisions`` (``ReviewDecision`` v2, ``action=decide``) and the review service's export
  (:mod:`pipeline.review.feedback`, the ``--feedback`` format): a reviewer's decision. Reviewer labels outrank
  model labels for the same item and text; the latest decision (an appeal outcome) wins among reviewers.
* Verdicts and decisions do not carry the text: the text is joined from ``moderation.escalations``
  (``Escalation.item``, every item the reasoner saw) and ``moderation.review`` (``ReviewTask.item``) by
  ``(content_id, revision)``. A verdict whose escalation is no longer retained on the topic cannot become a row
  (counted as ``unmatched``): harvest more often than the topics' retention.

Rows are written as JSON lines (:data:`ROW_FIELDS`); the text is content, so the file is as sensitive as the
topics it came from (keep it in the state dir, never commit it).

Promotion (:func:`retrain`): a deterministic share of the rows (by a hash of the text) is held back and never
trained on; the candidate and the artefact in service are both routed over those rows, and the candidate is
promoted only when it escalates less while its auto-decided accuracy stays at the target (or, when the one in
service is below the target, does not fall below it). The comparison goes into the candidate's model card.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.schemas import (
    Decision,
    Escalation,
    ReviewAction,
    ReviewDecision,
    ReviewTask,
    Stage,
    Verdict,
    VerdictStatus,
    is_policy_audit,
    validate_wire,
)
from triage_models.data import CATEGORIES, UNKNOWN, LabelledSet, load_feedback
from triage_models.sources import hash_split

logger = logging.getLogger(__name__)

ROW_FIELDS = ("text", "label", "categories", "source", "confidence", "policies", "triage_model_version",
              "content_id", "revision", "decided_at", "evidence_id")
SOURCE_RANK = {"review": 2, "reasoner": 1, "oracle": 1}
MIN_CONFIDENCE = 0.7
HOLDOUT_SHARE = 0.2
MIN_HELD_BACK = 30


@dataclass
class Harvest:
    rows: list[dict[str, Any]]
    counts: dict[str, int]


def _categories(label: int, policy_ids: list[str], violated: list[str],
                category_policies: dict[str, str]) -> dict[str, int]:
    """Category labels a decision implies: allow -> every category of the checked policies is 0; block under P ->
    P's category is 1 when P has exactly one (hate covers H and H2: which one stays unknown)."""
    out: dict[str, int] = {}
    for policy in policy_ids if label == 0 else violated:
        cats = sorted(c for c, p in category_policies.items() if p == policy)
        if label == 0:
            out |= {c: 0 for c in cats}
        elif len(cats) == 1:
            out[cats[0]] = 1
    return out


def _parse(model: type, lines: Iterable[bytes | str | dict]) -> list[Any]:
    out = []
    for line in lines:
        data = line if isinstance(line, dict) else json.loads(line)
        out.append(validate_wire(model, data))
    return out


def harvest(*, escalations: Iterable[Any] = (), verdicts: Iterable[Any] = (), decisions: Iterable[Any] = (),
            review_tasks: Iterable[Any] = (), feedback: Path | None = None,
            category_policies: dict[str, str] | None = None, min_confidence: float = MIN_CONFIDENCE) -> Harvest:
    """Labelled rows from decoded topic messages (raw JSON lines, dicts or wire models) and a review export."""
    category_policies = category_policies or {}
    esc = [e if isinstance(e, Escalation) else _parse(Escalation, [e])[0] for e in escalations]
    tasks = [t if isinstance(t, ReviewTask) else _parse(ReviewTask, [t])[0] for t in review_tasks]
    ver = [v if isinstance(v, Verdict) else _parse(Verdict, [v])[0] for v in verdicts]
    # moderation.decisions also carries the policy lifecycle's entries (PolicyAudit): no reviewer label in those.
    dec = [d if isinstance(d, ReviewDecision) else _parse(ReviewDecision, [d])[0] for d in decisions
           if not is_policy_audit(d)]
    texts: dict[tuple[str, int], tuple[str, str | None]] = {}
    for e in esc:
        texts[(e.item.content_id, e.revision)] = (e.item.text, e.triage.model_version)
    for t in tasks:
        texts.setdefault((t.item.content_id, t.revision), (t.item.text, t.triage.model_version))
    counts = {"verdicts_final_reasoner": 0, "low_confidence": 0, "review_decisions": 0, "unmatched": 0,
              "feedback_rows": 0}
    candidates: list[dict[str, Any]] = []
    for v in ver:
        if v.status is not VerdictStatus.FINAL or v.stage is not Stage.REASONER:
            continue
        counts["verdicts_final_reasoner"] += 1
        label = int(v.decision is Decision.BLOCK)
        last: dict[str, Any] = {}
        for call in v.reasoner_calls:  # later calls (higher effort) replace earlier ones per policy
            if call.violation is not None:
                last[call.policy.policy_id] = call
        deciding = [c for c in last.values() if bool(c.violation) == bool(label)] if label else list(last.values())
        confidences = [c.confidence for c in deciding]
        if not deciding or any(c is None or c < min_confidence for c in confidences):
            counts["low_confidence"] += 1
            continue
        key = (v.content_id, v.revision)
        if key not in texts:
            counts["unmatched"] += 1
            continue
        text, triage_version = texts[key]
        violated = [c.policy.policy_id for c in deciding] if label else []
        candidates.append({
            "text": text, "label": label,
            "categories": _categories(label, list(last), violated, category_policies),
            "source": "reasoner", "confidence": float(min(confidences)),
            "policies": {p.policy_id: f"{p.version}@{p.content_hash}" for p in v.policies},
            "triage_model_version": triage_version, "content_id": v.content_id, "revision": v.revision,
            "decided_at": v.decided_at.isoformat(), "evidence_id": v.verdict_id})
    for d in dec:
        if d.action is not ReviewAction.DECIDE or d.decision is None:
            continue
        counts["review_decisions"] += 1
        key = (d.content_id, d.revision)
        if key not in texts:
            counts["unmatched"] += 1
            continue
        text, triage_version = texts[key]
        label = int(d.decision is Decision.BLOCK)
        policy = [d.policy_id] if d.policy_id else []
        candidates.append({
            "text": text, "label": label, "categories": _categories(label, policy, policy, category_policies),
            "source": "review", "confidence": None, "policies": {d.policy_id: "reviewer"} if d.policy_id else {},
            "triage_model_version": triage_version, "content_id": d.content_id, "revision": d.revision,
            "decided_at": d.occurred_at.isoformat(), "evidence_id": d.decision_id})
    if feedback is not None:
        for line in Path(feedback).read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            row = json.loads(line)
            counts["feedback_rows"] += 1
            candidates.append({
                "text": row["text"], "label": int(row["label"]), "categories": row.get("categories") or {},
                "source": "review", "confidence": None,
                "policies": {row["policy_id"]: "reviewer"} if row.get("policy_id") else {},
                "triage_model_version": None, "content_id": None, "revision": None,
                "decided_at": str(row.get("decided_at") or ""), "evidence_id": row.get("rule_id")})
    rows = resolve(candidates)
    counts["rows"] = len(rows)
    counts["review_rows"] = sum(r["source"] == "review" for r in rows)
    return Harvest(rows=rows, counts=counts)


def resolve(candidates: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per text: a reviewer's label outranks a model's; among equals the latest ``decided_at`` wins."""
    best: dict[str, dict[str, Any]] = {}
    for row in candidates:
        current = best.get(row["text"])
        rank = (SOURCE_RANK.get(row["source"], 0), row["decided_at"])
        if current is None or rank >= (SOURCE_RANK.get(current["source"], 0), current["decided_at"]):
            best[row["text"]] = row
    return sorted(best.values(), key=lambda r: (r["decided_at"], r["text"]))


def write_rows(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps({k: row.get(k) for k in ROW_FIELDS}, sort_keys=True) + "\n")
    return path


def read_rows(path: Path) -> list[dict[str, Any]]:
    out = []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
            raise ValueError(f"{path}:{line_no}: a learning row needs a string 'text' and a 'label' of 0 or 1")
        out.append(row)
    return out


def rows_to_set(rows: list[dict[str, Any]], name: str = "learning") -> LabelledSet:
    """Learning rows as calibration rows: ``label`` is the ``any`` label, stated categories known, others unknown."""
    import hashlib

    texts = [r["text"] for r in rows]
    labels = {c: np.asarray([int((r.get("categories") or {}).get(c, UNKNOWN)) for r in rows], dtype=np.int8)
              for c in CATEGORIES}
    digest = hashlib.sha256("".join(json.dumps(r, sort_keys=True) for r in rows).encode()).hexdigest()
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[r["source"]] = by_source.get(r["source"], 0) + 1
    return LabelledSet(name=name, texts=texts, labels=labels, sha256=digest,
                       any_override=np.asarray([r["label"] for r in rows], dtype=np.int8),
                       sources=({"name": name, "file": "(learning rows)", "sha256": digest, "rows": len(rows),
                                 "license": "project-internal verdicts and reviewer decisions",
                                 "by_source": by_source},))


def split_rows(rows: list[dict[str, Any]], share: float = HOLDOUT_SHARE) -> tuple[list[dict], list[dict]]:
    """(train, held back): a stable split by a hash of each text; held-back rows are never trained on."""
    held = [r for r in rows if hash_split(r["text"], share) == "test"]
    train = [r for r in rows if hash_split(r["text"], share) != "test"]
    return train, held


async def read_topics(kafka: Any, names: list[str], *, timeout_s: float = 30.0) -> dict[str, list[bytes]]:
    """Every message value currently on each topic (from the beginning to the end offsets seen at start)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    out: dict[str, list[bytes]] = {n: [] for n in names}
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=200)
    await asyncio.wait_for(consumer.start(), timeout_s)
    try:
        await consumer.topics()
        tps = [TopicPartition(n, p) for n in names for p in sorted(consumer.partitions_for_topic(n) or ())]
        if not tps:
            return out
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        await consumer.seek_to_beginning(*tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        pending = {tp for tp in tps if ends[tp] > 0}
        while pending and loop.time() < deadline:
            batch = await consumer.getmany(*pending, timeout_ms=500, max_records=5000)
            for tp, messages in batch.items():
                for message in messages:
                    if message.value is not None:
                        out[tp.topic].append(message.value)
                    if message.offset + 1 >= ends[tp]:
                        pending.discard(tp)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
        return out
    finally:
        await consumer.stop()


def route_metrics(model: Any, x: np.ndarray, texts: list[str], y: np.ndarray) -> dict[str, Any]:
    """Escalation and auto-decided accuracy of ``model``'s whole route over labelled rows (training prior)."""
    from pipeline.triage.eval import route_report, route_rows
    from pipeline.triage.language import LanguageDetector

    raw = model.raw_probabilities(x, texts)
    languages = [d.language for d in LanguageDetector().detect_many(texts)] if model.thresholds.languages else None
    return route_report(route_rows(model.thresholds, model.categories, raw, languages), y, np.arange(len(y)))


def promotion_decision(current: dict[str, Any], candidate: dict[str, Any], target: float,
                       held_back: int) -> tuple[bool, str]:
    """Promote only when the candidate escalates less and its auto-decided accuracy holds."""
    if held_back < MIN_HELD_BACK:
        return False, f"only {held_back} held-back rows (need {MIN_HELD_BACK})"
    floor = min(target, current["auto_accuracy"] if current["auto_accuracy"] is not None else target)
    acc = candidate["auto_accuracy"]
    if acc is None or acc < floor:
        return False, f"auto-decided accuracy {acc} below {floor:.3f}"
    if candidate["escalation_rate"] >= current["escalation_rate"]:
        return False, (f"escalates {candidate['escalation_rate']:.3f}, not less than the current "
                       f"{current['escalation_rate']:.3f}")
    return True, (f"escalates {candidate['escalation_rate']:.3f} < {current['escalation_rate']:.3f} at accuracy "
                  f"{acc:.3f} >= {floor:.3f}")


def retrain(rows: list[dict[str, Any]], *, datasets_dir: Path, model_dir: Path, out_dir: Path,
            target_accuracy: float = 0.97, holdout_share: float = HOLDOUT_SHARE, promote: bool = True,
            nested: bool = True, extra_sources: list[str] | None = None, progress: bool = False,
            cache_dir: Path | None = None, embedder: Any = None) -> dict[str, Any]:
    """Train a candidate on the base recipe + the training share of ``rows``; compare it with the artefact in
    ``model_dir`` on the held-back share; promote (copy over ``model_dir``, keeping ``<model_dir>.previous``)
    only when it wins. Returns the comparison (also written into the candidate's model card)."""
    from pipeline.triage import TriageModel, make_embedder
    from triage_models.train import embed_with_cache, render_model_card, train

    train_rows, held = split_rows(rows, holdout_share)
    learning = rows_to_set(train_rows) if train_rows else None
    embedder = embedder or make_embedder("onnx-int8", cache_size=0)
    card = train(out_dir, datasets_dir=datasets_dir, target_accuracy=target_accuracy, progress=progress,
                 learning=learning, nested=nested, previous_dir=model_dir, extra_sources=extra_sources,
                 cache_dir=cache_dir, embedder=embedder)
    comparison: dict[str, Any] = {"held_back_rows": len(held), "train_rows": len(train_rows),
                                  "holdout_share": holdout_share, "target_accuracy": target_accuracy}
    if held:
        texts = [r["text"] for r in held]
        y = np.asarray([r["label"] for r in held], dtype=np.int8)
        x, _ = embed_with_cache(embedder, texts, cache_dir=cache_dir, progress=False)
        current = route_metrics(TriageModel.load(model_dir, embedder=embedder), x, texts, y)
        candidate = route_metrics(TriageModel.load(out_dir, embedder=embedder), x, texts, y)
        promoted, reason = promotion_decision(current, candidate, target_accuracy, len(held))
        comparison |= {"current": current, "candidate": candidate}
    else:
        promoted, reason = False, "no held-back rows"
    promoted = promoted and promote
    comparison |= {"promoted": promoted, "reason": reason}
    card_path = out_dir / "model_card.json"
    card = json.loads(card_path.read_text())
    card.setdefault("comparison", None)
    card["comparison"] = (card["comparison"] or {"previous": None}) | {
        "held_back": {k: comparison[k] for k in ("current", "candidate") if k in comparison},
        "promoted": promoted, "reason": reason, "held_back_rows": len(held)}
    card_path.write_text(json.dumps(card, indent=1) + "\n")
    if card["comparison"].get("previous"):
        (out_dir / "MODEL_CARD.md").write_text(render_model_card(card))
    if promoted:
        promote_artefact(out_dir, model_dir)
    logger.info("triage retrain: candidate %s %s (%s)", card["version"], "promoted" if promoted else "kept back",
                reason)
    return {"candidate_version": card["version"], **comparison}


def promote_artefact(candidate_dir: Path, model_dir: Path) -> None:
    """Replace the artefact in ``model_dir`` with the candidate's files; the old one moves to ``.previous``."""
    model_dir = Path(model_dir)
    backup = model_dir.with_name(model_dir.name + ".previous")
    staging = model_dir.with_name(model_dir.name + ".incoming")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(candidate_dir, staging)
    if model_dir.exists():
        shutil.rmtree(backup, ignore_errors=True)
        model_dir.rename(backup)
    staging.rename(model_dir)


def load_rows_file(path: Path) -> LabelledSet:
    """A learning-rows file, or a review export (the ``--feedback`` format), as calibration rows."""
    rows = read_rows(path)
    if rows and "source" in rows[0] and "evidence_id" in rows[0]:
        return rows_to_set(rows)
    return load_feedback(path)
