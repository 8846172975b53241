"""``modpipe triage eval``: how good the triage classifier is, in numbers and plots.

Two modes, because they answer different questions:

* ``--cv K``: train and score from scratch in K folds on the data set (bands nested inside each training fold):
  what a model trained this way achieves on data like this. The honest number for the training set itself.
* no ``--cv``: score the data set with a trained artefact and its thresholds: how *this* model behaves on
  other data (XSTest and HateCheck are false-positive traps). If the data set was part of the artefact's
  training data the report says ``in_sample: true``: those numbers are optimistic.

Every report has the binary (``any``) metrics -- roc_auc, pr_auc, f1, precision, recall at p >= 0.5 --
auto_accuracy (accuracy on the items the band decides automatically) and escalation_rate, the same per category
where the data set has category labels, and two PNG plots: the precision-recall curve and the trade-off between
escalation rate and auto-decided accuracy (one point per target accuracy, band chosen for that target).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_auc_score,
)

from pipeline.triage import ANY_HEAD, TriageModel, make_embedder
from triage_models.data import CATEGORIES, LabelledSet, load_dataset
from triage_models.train import band_stats, choose_band, cross_validate, embed_with_cache

logger = logging.getLogger(__name__)

TRADE_OFF_TARGETS = (0.80, 0.85, 0.90, 0.92, 0.94, 0.95, 0.96, 0.97, 0.98, 0.99)


def binary_metrics(p: np.ndarray, y: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Threshold-free and thresholded metrics of one head; AUCs are None when only one class is present."""
    y = np.asarray(y, dtype=np.int8)
    both = 0 < int(y.sum()) < len(y)
    pred = p >= threshold
    return {
        "rows": int(len(y)), "positives": int(y.sum()),
        "roc_auc": float(roc_auc_score(y, p)) if both else None,
        "pr_auc": float(average_precision_score(y, p)) if both else None,
        "f1": float(f1_score(y, pred, zero_division=0)), "precision": float(precision_score(y, pred, zero_division=0)),
        "recall": float(recall_score(y, pred, zero_division=0)), "threshold": threshold,
        "positive_rate": float(pred.mean()) if len(y) else None,
    }


def trade_off(p: np.ndarray, y: np.ndarray) -> list[dict[str, float]]:
    """Escalation rate vs auto-decided accuracy, one band per target (chosen and scored on these probabilities)."""
    points = []
    for target in TRADE_OFF_TARGETS:
        lo, hi = choose_band(p, y, target, confidence_z=0.0)
        stats = band_stats(p, y, lo, hi)
        points.append({"target": target, "allow_below": lo, "block_above": hi, "auto_accuracy": stats["auto_accuracy"],
                       "escalation_rate": stats["escalation_rate"]})
    return points


def _labels(data: LabelledSet) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    y_any, rows_any = data.any_labels()
    out = {ANY_HEAD: (rows_any, y_any)}
    for c in CATEGORIES:
        rows = data.category_rows(c)
        y = data.labels[c][rows]
        if len(rows) and 0 < int(y.sum()) < len(rows):
            out[c] = (rows, y.astype(np.int8))
    return out


def evaluate(dataset: str, *, datasets_dir: Path, cv: int | None = None, model_dir: Path | None = None,
             embedder_backend: str = "onnx-int8", target_accuracy: float = 0.97, plots_dir: Path | None = None,
             progress: bool = True, seed: int = 0) -> dict[str, Any]:
    """Evaluate on ``dataset`` (a public set's name, read from ``datasets_dir``, or a feedback-format file); write
    plots to ``plots_dir``."""
    data = load_dataset(dataset, datasets_dir)
    labels = _labels(data)
    report: dict[str, Any] = {"dataset": data.name, "sources": list(data.sources), "rows": len(data)}
    if cv:
        embedder = make_embedder(embedder_backend, cache_size=0)
        x, _ = embed_with_cache(embedder, data.texts, progress=progress)
        oof, nested = cross_validate(x.astype(np.float64), data, "known_zero", target_accuracy=target_accuracy,
                                     seed=seed, progress=progress, folds=cv)
        probs = {name: oof[name] for name in labels if name in oof}
        report |= {"mode": f"{cv}-fold stratified CV (bands nested in training folds)", "embedder": embedder.name,
                   "target_accuracy": target_accuracy, "auto_accuracy": nested["auto_accuracy"],
                   "escalation_rate": nested["escalation_rate"]}
        bands = {name: nested["heads"][name] for name in probs}
    else:
        from pipeline.config import TriageSettings

        model = TriageModel.load(model_dir or TriageSettings().model_dir,
                                 embedder=make_embedder(embedder_backend, cache_size=0))
        x, _ = embed_with_cache(model.embedder, data.texts, progress=progress)
        scored = model.score_embeddings(x)
        probs = {ANY_HEAD: np.asarray([v for v, _ in scored])}
        for c in model.categories:
            probs[c] = np.asarray([cats[c] for _, cats in scored])
        trained_on = {s["sha256"] for s in model.model_card.get("data", {}).get("sources", [])}
        trained_on.add(model.model_card.get("data", {}).get("sha256", ""))
        rows_any, y_any = labels[ANY_HEAD]
        t = model.thresholds
        band = band_stats(probs[ANY_HEAD][rows_any], y_any, t.allow_below, t.block_above)
        hr = np.zeros(len(data), dtype=bool)
        for c, level in t.high_risk.items():
            hr |= probs[c] >= level
        p_any = probs[ANY_HEAD][rows_any]
        auto = ((p_any < t.allow_below) | (p_any >= t.block_above)) & ~hr[rows_any]
        correct = ((p_any < t.allow_below) & (y_any == 0)) | ((p_any >= t.block_above) & (y_any == 1))
        report |= {"mode": "trained artefact", "model_version": model.version, "embedder": model.embedder.name,
                   "in_sample": bool({s["sha256"] for s in data.sources} & trained_on),
                   "auto_accuracy": band["auto_accuracy"], "escalation_rate": band["escalation_rate"],
                   "route": {"auto_accuracy": float(correct[auto].mean()) if auto.any() else None,
                             "escalation_rate": float(1 - auto.mean()), "high_risk_rate": float(hr[rows_any].mean()),
                             "auto_block_rate_of_negatives": float(((p_any >= t.block_above) & auto)[y_any == 0].mean())
                             if (y_any == 0).any() else None}}
        bands = {ANY_HEAD: band}
        for c, (rows, y) in labels.items():
            if c != ANY_HEAD and c in model.head_bands:
                bands[c] = band_stats(probs[c][rows], y, *model.head_bands[c])
    rows_any, y_any = labels[ANY_HEAD]
    report |= binary_metrics(probs[ANY_HEAD][rows_any], y_any)
    report["per_category"] = {
        c: binary_metrics(probs[c][rows], y) | ({"band": bands[c]} if c in bands else {})
        for c, (rows, y) in labels.items() if c != ANY_HEAD and c in probs
    }
    report["trade_off"] = trade_off(probs[ANY_HEAD][rows_any], y_any) if 0 < y_any.sum() < len(y_any) else []
    if plots_dir is not None:
        report["plots"] = write_plots(report, probs[ANY_HEAD][rows_any], y_any, plots_dir)
    return report


def write_plots(report: dict[str, Any], p: np.ndarray, y: np.ndarray, plots_dir: Path) -> dict[str, str]:
    """precision-recall curve and escalation-vs-accuracy trade-off as PNG files; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots_dir.mkdir(parents=True, exist_ok=True)
    stem = report["dataset"].replace("+", "_")
    paths = {"precision_recall": plots_dir / f"triage-{stem}-pr.png",
             "escalation_vs_accuracy": plots_dir / f"triage-{stem}-escalation.png"}
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    if 0 < y.sum() < len(y):
        precision, recall, _ = precision_recall_curve(y, p)
        ax.plot(recall, precision, label=f"any (PR-AUC {report['pr_auc']:.3f})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title(f"triage precision-recall: {report['dataset']}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(paths["precision_recall"])
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    points = [pt for pt in report.get("trade_off", []) if pt["auto_accuracy"] == pt["auto_accuracy"]]
    if points:
        ax.plot([pt["escalation_rate"] for pt in points], [pt["auto_accuracy"] for pt in points], marker="o",
                label="band chosen per target (on these scores)")
    if report.get("auto_accuracy") is not None and report["auto_accuracy"] == report["auto_accuracy"]:
        ax.scatter([report["escalation_rate"]], [report["auto_accuracy"]], color="red", zorder=3,
                   label="operating point" + (" (nested)" if "CV" in report.get("mode", "") else ""))
    ax.set_xlabel("escalation rate")
    ax.set_ylabel("accuracy of auto-decided items")
    ax.set_title(f"triage escalation vs accuracy: {report['dataset']}")
    ax.set_xlim(0, 1)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(paths["escalation_vs_accuracy"])
    plt.close(fig)
    return {k: str(v) for k, v in paths.items()}
