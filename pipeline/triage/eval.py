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

from pipeline.router import TriageRoute, TriageThresholds, route_triage
from pipeline.schemas import TriageScores
from pipeline.triage import ANY_HEAD, TriageModel, make_embedder
from pipeline.triage.language import LanguageDetector
from pipeline.triage.lexical import LexicalFeatures
from pipeline.triage.prior import PriorAdapter, shift_probabilities
from triage_models.data import CATEGORIES, LabelledSet, load_dataset
from triage_models.train import (
    band_stats,
    choose_band,
    cross_validate,
    embed_with_cache,
    load_extras,
)

PRIOR_CHOICES = ("off", "adaptive", "oracle")
EVAL_BATCH = 32  # items per scoring call when replaying a set through the adaptive prior, as a worker would

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


def replay_priors(model: TriageModel, raw: np.ndarray, mode: str, *, y: np.ndarray | None = None,
                  batch: int = EVAL_BATCH, **adapter: Any) -> tuple[np.ndarray, dict[str, Any]]:
    """``raw`` (items x heads, in arrival order) as a worker with prior ``mode`` would have scored them.

    ``adaptive``: a fresh :class:`PriorAdapter` (worker defaults unless given) corrects each batch with the priors
    in force before it, then observes it. ``oracle``: the set's true violation rate for the ``any`` head (categories
    scaled alike): the best a prior correction could do. ``off``: unchanged.
    """
    if mode == "off":
        return raw, {"mode": "off"}
    heads = model.heads_order
    train = np.asarray([model.train_priors[h] for h in heads])
    if mode == "oracle":
        if y is None:
            raise ValueError("the oracle prior needs labels")
        target = float(np.mean(y))
        priors = train * (target / train[0])
        priors[0] = target
        corrected = shift_probabilities(raw, train, priors)
        budget = adapter.get("miss_budget", 0.2)
        info: dict[str, Any] = {"mode": "oracle", "any_prior": target, "miss_budget": budget}
        if budget is not None:
            from pipeline.triage.prior import miss_capped_allow

            cap = miss_capped_allow(corrected[:, 0], budget)
            info |= {"allow_cap": cap, "allow_caps": np.full(len(raw), cap)}
        return corrected, info
    if mode != "adaptive":
        raise ValueError(f"prior mode must be one of {PRIOR_CHOICES}")
    settings = {"min_prior": 0.02, "max_prior": 0.5, "window": 2000, "min_items": 500, "update_every": 100,
                "miss_budget": 0.2} | adapter
    prior = PriorAdapter(heads=list(heads), train_priors=train, mode="adaptive", **settings)
    out = np.zeros_like(raw)
    caps = np.full(len(raw), np.nan)
    trace = []
    for start in range(0, len(raw), batch):
        out[start:start + batch] = prior.correct(raw[start:start + batch])
        caps[start:start + batch] = np.nan if prior.allow_cap is None else prior.allow_cap
        prior.observe(raw[start:start + batch])
        trace.append(float(prior.priors[0]))
    return out, {"mode": "adaptive", **settings, "final_any_prior": float(prior.priors[0]),
                 "final_allow_cap": prior.allow_cap, "allow_caps": caps,
                 "any_prior_trace_every_batch": trace[:: max(1, len(trace) // 20)]}


def route_rows(model_thresholds: TriageThresholds, categories: list[str], probs: np.ndarray,
               languages: list[str | None] | None, allow_caps: np.ndarray | None = None) -> list[TriageRoute]:
    """The router's decision for each row (``probs``: items x heads, ``any`` first), enforcing every policy the
    classifier covers (what triage decides on its own). ``allow_caps``: the prior adapter's allow cap in force for
    each row (NaN: none), as :attr:`TriageModel.thresholds` applies it."""
    from dataclasses import replace

    enforcing = sorted(set(model_thresholds.category_policies.values()))
    out = []
    for i, row in enumerate(probs):
        scores = TriageScores(model_version="eval", violation=float(row[0]),
                              categories={c: float(v) for c, v in zip(categories, row[1:], strict=True)},
                              latency_ms=0.0)
        thresholds = model_thresholds
        if allow_caps is not None and allow_caps[i] == allow_caps[i] and allow_caps[i] < thresholds.allow_below:
            thresholds = replace(thresholds, allow_below=float(allow_caps[i]))
        out.append(route_triage(scores, thresholds, enforcing,
                                language=languages[i] if languages is not None else None).route)
    return out


def route_report(routes: list[TriageRoute], y: np.ndarray, rows: np.ndarray) -> dict[str, Any]:
    r = np.asarray([routes[i].value for i in rows])
    allow, block = r == TriageRoute.ALLOW.value, r == TriageRoute.BLOCK.value
    auto = allow | block
    correct = (allow & (y == 0)) | (block & (y == 1))
    return {"auto_accuracy": float(correct[auto].mean()) if auto.any() else None,
            "escalation_rate": float(1 - auto.mean()), "allow_rate": float(allow.mean()),
            "block_rate": float(block.mean()),
            "auto_block_rate_of_negatives": float(block[y == 0].mean()) if (y == 0).any() else None,
            "auto_allow_rate_of_positives": float(allow[y == 1].mean()) if (y == 1).any() else None}


def evaluate(dataset: str, *, datasets_dir: Path, cv: int | None = None, model_dir: Path | None = None,
             embedder_backend: str = "onnx-int8", target_accuracy: float = 0.97, plots_dir: Path | None = None,
             progress: bool = True, seed: int = 0, prior: str = "off", language_gate: bool = True,
             data: LabelledSet | None = None, miss_budget: float | None = 0.2) -> dict[str, Any]:
    """Evaluate on ``dataset`` (a public set's name, read from ``datasets_dir``, or a feedback-format file); write
    plots to ``plots_dir``. ``prior`` (artefact mode): replay the rows through a prior correction
    (:func:`replay_priors`); ``language_gate``: apply the artefact's language rule. ``data`` overrides loading."""
    data = data if data is not None else load_dataset(dataset, datasets_dir)
    labels = _labels(data)
    report: dict[str, Any] = {"dataset": data.name, "sources": list(data.sources), "rows": len(data)}
    if cv:
        embedder = make_embedder(embedder_backend, cache_size=0)
        x, _ = embed_with_cache(embedder, data.texts, progress=progress)
        anchor = dataset == "openai_moderation"  # the training recipe's own set: same extras and lexical view
        extras = load_extras(datasets_dir, None, embedder, lexical=True, weight=0.5, cache_dir=None,
                             progress=progress) if anchor else None
        counts = LexicalFeatures().counts(data.texts)
        oof, nested = cross_validate(x.astype(np.float64), data, "known_zero", target_accuracy=target_accuracy,
                                     seed=seed, progress=progress, folds=cv, extras=extras, counts=counts)
        probs = {name: oof[name] for name in labels if name in oof}
        report |= {"mode": f"{cv}-fold stratified CV (bands nested in training folds)", "embedder": embedder.name,
                   "target_accuracy": target_accuracy, "auto_accuracy": nested["auto_accuracy"],
                   "escalation_rate": nested["escalation_rate"], "route": nested["route"],
                   "extra_training_rows": int(len(extras.data)) if extras is not None else 0}
        bands = {name: nested["heads"][name] for name in probs}
    else:
        from pipeline.config import TriageSettings

        model = TriageModel.load(model_dir or TriageSettings().model_dir,
                                 embedder=make_embedder(embedder_backend, cache_size=0))
        x, _ = embed_with_cache(model.embedder, data.texts, progress=progress)
        raw = model.raw_probabilities(x, data.texts)
        rows_any, y_any = labels[ANY_HEAD]
        corrected, prior_info = replay_priors(model, raw, prior, y=y_any if len(rows_any) == len(data) else None,
                                              miss_budget=miss_budget)
        probs = {ANY_HEAD: corrected[:, 0]}
        for j, c in enumerate(model.categories, start=1):
            probs[c] = corrected[:, j]
        trained_on = {s["sha256"] for s in model.model_card.get("data", {}).get("sources", [])}
        trained_on.add(model.model_card.get("data", {}).get("sha256", ""))
        trained_on |= {s["sha256"] for s in model.model_card.get("data", {}).get("extra_sources", [])}
        t = model.thresholds
        band = band_stats(probs[ANY_HEAD][rows_any], y_any, t.allow_below, t.block_above)
        languages = None
        if language_gate and t.languages:
            languages = [d.language for d in LanguageDetector().detect_many(data.texts)]
        caps = prior_info.pop("allow_caps", None)
        route = route_report(route_rows(t, model.categories, corrected, languages, caps), y_any, rows_any)
        if caps is not None:
            q = corrected[rows_any, 0]
            route["expected_miss_share"] = float(q[q < np.nan_to_num(caps[rows_any], nan=t.allow_below)].sum()
                                                 / max(q.sum(), 1e-12))
        if languages is not None:
            route["unvalidated_language_rate"] = float(np.mean([languages[i] is not None and languages[i] not in
                                                                t.languages for i in rows_any]))
        report |= {"mode": "trained artefact", "model_version": model.version, "embedder": model.embedder.name,
                   "in_sample": bool({s["sha256"] for s in data.sources} & trained_on),
                   "prior": prior_info, "language_gate": bool(languages is not None),
                   "auto_accuracy": band["auto_accuracy"], "escalation_rate": band["escalation_rate"],
                   "route": route}
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
