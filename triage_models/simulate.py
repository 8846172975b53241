"""``modpipe triage simulate``: replay a labelled stream as days of traffic and watch the learning loop work.

Each simulated day the artefact in service triages that day's items exactly as a worker would (the same router,
the language rule, the adaptive prior carried from day to day). Every escalated item is answered by an
**oracle standing in for the reasoner**: the stream's own label, as if gpt-oss-safeguard (or a reviewer) had
decided it correctly. Those answers become learning rows (source ``oracle``); at the end of the day a candidate is
retrained on the base recipe plus the rows so far and promoted only if it beats the artefact in service on the
held-back rows (:func:`triage_models.loop.retrain`, the same gate as ``modpipe triage retrain``).

Reported per day: escalation rate and auto-decided accuracy (against the stream's labels), the prior in force,
and whether a candidate was promoted; plotted to a PNG next to the JSON. The oracle is the optimistic part: a real
reasoner is wrong sometimes, and its mistakes would be learnt too (the loop keeps only confident answers).

Cost control for a small machine: the stream is embedded once (cached on disk) and candidates are trained
without the outer cross-validation and without the extra public sets (``extra_sources=[]``), so a day's retrain
takes tens of seconds; the first day is triaged by the artefact in service, whatever recipe made it.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.triage import TriageModel, make_embedder
from pipeline.triage.eval import route_report, route_rows
from pipeline.triage.language import LanguageDetector
from pipeline.triage.prior import PriorAdapter
from triage_models.loop import retrain
from triage_models.train import embed_with_cache

logger = logging.getLogger(__name__)

ORACLE_NOTE = ("the reasoner is simulated by an oracle: every escalated item gets the stream's own label, as if "
               "gpt-oss-safeguard had decided it correctly")


def read_stream(path: Path) -> tuple[list[str], np.ndarray]:
    """A labelled stream: JSON lines with ``text`` and ``label`` (0/1), in arrival order."""
    texts, labels = [], []
    for line_no, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not isinstance(row.get("text"), str) or row.get("label") not in (0, 1):
            raise ValueError(f"{path}:{line_no}: a stream row needs a string 'text' and a 'label' of 0 or 1")
        texts.append(row["text"])
        labels.append(int(row["label"]))
    if not texts:
        raise ValueError(f"{path} holds no rows")
    return texts, np.asarray(labels, dtype=np.int8)


def write_stream(path: Path, texts: list[str], labels: np.ndarray, source: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for text, label in zip(texts, labels, strict=True):
            handle.write(json.dumps({"text": text, "label": int(label), "source": source}) + "\n")
    return path


def simulate(stream: Path, *, days: int, datasets_dir: Path, model_dir: Path, work_dir: Path,
             target_accuracy: float = 0.97, prior_mode: str = "adaptive", cache_dir: Path | None = None,
             progress: bool = False, on_day: Any = None, miss_budget: float | None = 0.2) -> dict[str, Any]:
    """Run the simulation; ``work_dir`` receives the per-day candidates and the artefact in service."""
    texts, labels = read_stream(stream)
    if days < 1 or days > len(texts):
        raise ValueError(f"days must be between 1 and the stream's {len(texts)} rows")
    embedder = make_embedder("onnx-int8", cache_size=0)
    x, _ = embed_with_cache(embedder, texts, cache_dir=cache_dir, progress=progress)
    detector = LanguageDetector()
    languages = [d.language for d in detector.detect_many(texts)]
    serving = work_dir / "serving"
    shutil.rmtree(work_dir, ignore_errors=True)
    work_dir.mkdir(parents=True)
    shutil.copytree(model_dir, serving)
    model = TriageModel.load(serving, embedder=embedder)
    def new_prior(model: TriageModel) -> PriorAdapter | None:
        # A worker that loads a new artefact starts its estimate afresh from that artefact's training priors.
        if prior_mode == "off":
            return None
        return PriorAdapter(heads=list(model.heads_order),
                            train_priors=np.asarray([model.train_priors[h] for h in model.heads_order]),
                            mode="adaptive", min_prior=0.02, miss_budget=miss_budget)

    prior = new_prior(model)
    bounds = np.linspace(0, len(texts), days + 1).astype(int)
    learned: list[dict[str, Any]] = []
    report_days = []
    for day in range(days):
        lo, hi = bounds[day], bounds[day + 1]
        raw = model.raw_probabilities(x[lo:hi], texts[lo:hi])
        probs = np.zeros_like(raw)
        caps = np.full(len(raw), np.nan)
        for start in range(0, len(raw), 32):  # the worker's batch size: priors move between batches
            chunk = raw[start:start + 32]
            probs[start:start + 32] = prior.correct(chunk) if prior is not None else chunk
            if prior is not None:
                caps[start:start + 32] = np.nan if prior.allow_cap is None else prior.allow_cap
                prior.observe(chunk)
        routes = route_rows(model.thresholds, model.categories, probs, languages[lo:hi], caps)
        y = labels[lo:hi]
        stats = route_report(routes, y, np.arange(hi - lo))
        escalated = [i for i, r in enumerate(routes) if r.value == "escalate"]
        for i in escalated:
            learned.append({"text": texts[lo + i], "label": int(y[i]), "categories": {}, "source": "oracle",
                            "confidence": 1.0, "policies": {}, "triage_model_version": model.version,
                            "content_id": None, "revision": None, "decided_at": f"day-{day + 1:03d}-{i:06d}",
                            "evidence_id": None})
        entry = {"day": day + 1, "items": int(hi - lo), "model_version": model.version,
                 "escalation_rate": stats["escalation_rate"], "auto_accuracy": stats["auto_accuracy"],
                 "escalated": len(escalated), "learning_rows": len(learned),
                 "any_prior": float(prior.priors[0]) if prior is not None else None,
                 "allow_cap": prior.allow_cap if prior is not None else None}
        if day + 1 < days:
            result = retrain(learned, datasets_dir=datasets_dir, model_dir=serving,
                             out_dir=work_dir / f"candidate-day{day + 1}", target_accuracy=target_accuracy,
                             nested=False, extra_sources=[], cache_dir=cache_dir, embedder=embedder)
            entry["retrain"] = {k: result[k] for k in ("candidate_version", "promoted", "reason", "held_back_rows")}
            if result["promoted"]:
                model = TriageModel.load(serving, embedder=embedder)
                prior = new_prior(model)
        report_days.append(entry)
        logger.info("simulated day %d: escalation %.3f, auto accuracy %s", day + 1, entry["escalation_rate"],
                    entry["auto_accuracy"])
        if on_day is not None:
            on_day(entry)
    return {"stream": stream.name, "rows": len(texts), "violation_rate": float(labels.mean()), "days": report_days,
            "oracle": ORACLE_NOTE, "target_accuracy": target_accuracy, "prior_mode": prior_mode,
            "miss_budget": miss_budget,
            "starting_model": TriageModel.load(model_dir, embedder=embedder).version}


def plot(report: dict[str, Any], path: Path) -> Path:
    """Escalation rate and auto-decided accuracy per simulated day (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    days = [d["day"] for d in report["days"]]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5.5), dpi=100, sharex=True)
    top.plot(days, [d["escalation_rate"] for d in report["days"]], marker="o", color="tab:blue")
    for d in report["days"]:
        if d.get("retrain", {}).get("promoted"):
            top.annotate("promoted", (d["day"] + 0.5, d["escalation_rate"]), fontsize=7, color="tab:green",
                         ha="center")
    top.set_ylabel("escalation rate")
    top.set_ylim(0, max(0.05, max(d["escalation_rate"] for d in report["days"]) * 1.2))
    top.set_title(f"triage replay: {report['stream']} ({report['rows']} items, "
                  f"{report['violation_rate']:.1%} violating)", fontsize=9)
    accuracy = [d["auto_accuracy"] if d["auto_accuracy"] is not None else np.nan for d in report["days"]]
    bottom.plot(days, accuracy, marker="o", color="tab:orange")
    bottom.axhline(report["target_accuracy"], color="grey", linestyle="--", linewidth=1, label="target")
    bottom.set_ylabel("auto-decided accuracy")
    bottom.set_xlabel("simulated day")
    bottom.set_ylim(min(0.9, np.nanmin(accuracy) - 0.01), 1.0)
    bottom.legend(loc="lower right", fontsize=8)
    fig.text(0.01, 0.005, "oracle stands in for the reasoner (the stream's labels)", fontsize=7, color="grey")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
