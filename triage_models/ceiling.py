"""``modpipe triage ceiling``: how far a cheap stage can go on the OpenAI set, by stacking every view we have.

Why it exists: the embedder comparison (:mod:`triage_models.compare`) measures one embedder at a time. Issue 11
asks for ROC-AUC >= 0.93 and escalation <= 35 % at auto-decided accuracy >= 0.97 on this set; the question this
module answers is whether *any* combination of the offline encoders, richer heads and the lexical view gets there,
and, if not, how far away the best one is. It measures, on the same outer folds as ``modpipe triage train``:

* **stacks of views**: each view (a candidate embedder's vectors, or the hashed character n-grams) gets its own
  head, a logistic regression or an RBF support-vector machine; a logistic stacker fitted on their inner
  out-of-fold decision values weighs and calibrates them (what the worker's ``any`` head does with two views);
* the **nested** band: chosen on the training part's inner probabilities (Wilson margin, as in training), scored
  on the held-out part, pooled over the folds;
* the **hindsight** band: the band chosen on the pooled out-of-fold probabilities themselves, without the margin.
  It is optimistic by construction (it is fitted to the rows it scores), so it bounds what any band on that score
  can reach: if the hindsight escalation is above the target, no choice of band meets it;
* a **learning curve** for the worker's recipe and the best stack inside the speed budget: the same measurement
  with each training part cut to a quarter, a half and three quarters, which says what more in-domain rows (the
  learning loop's) would buy;
* the **speed** of a stack: its embedders run one after another on the same cores, so its rate is
  ``1 / sum(1 / rate_i)`` of the embedders' measured rates (the lexical view's ~1 ms a text is left out), as a
  ratio to sentence-transformers float32 (the baseline), timed in alternating rounds like the comparison.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
from sklearn.svm import SVC

from pipeline.triage.lexical import LexicalFeatures
from triage_models.heads import CONFIDENCE_Z, CV_FOLDS, HEAD_C, LEXICAL_C, band_stats, choose_band, pool

TARGET_ACCURACY = 0.97
TARGET_ROC_AUC = 0.93
TARGET_ESCALATION = 0.35
LEXICAL = "lexical"
HEAD_KINDS = ("logistic", "rbf")
LEARNING_FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# The stacks whose learning curves `modpipe triage ceiling` draws: the worker's recipe and the best one inside the
# speed budget.
CURVE_STACKS = ("worker recipe: minilm-int8 + lexical", "minilm-int8 + use-m3 + lexical")

# The stacks `modpipe triage ceiling` measures: (label, [(view, head kind), ...]). minilm-int8 + lexical with
# logistic heads is the worker's recipe (without the extra public rows, which only the worker's embedder has).
DEFAULT_STACKS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("worker recipe: minilm-int8 + lexical", (("minilm-int8", "logistic"), (LEXICAL, "logistic"))),
    ("minilm-int8 (rbf) + lexical", (("minilm-int8", "rbf"), (LEXICAL, "logistic"))),
    ("use-m3 + lexical", (("use-m3", "logistic"), (LEXICAL, "logistic"))),
    ("use-m3 (rbf) + lexical", (("use-m3", "rbf"), (LEXICAL, "logistic"))),
    ("minilm-int8 + use-m3 + lexical", (("minilm-int8", "logistic"), ("use-m3", "logistic"),
                                        (LEXICAL, "logistic"))),
    ("minilm-int8 (rbf) + use-m3 (rbf) + lexical", (("minilm-int8", "rbf"), ("use-m3", "rbf"),
                                                    (LEXICAL, "logistic"))),
    ("all three encoders (rbf) + lexical", (("minilm-int8", "rbf"), ("use-m3", "rbf"), ("e5-small-q4", "rbf"),
                                            (LEXICAL, "logistic"))),
    ("all three encoders (logistic and rbf) + lexical",
     (("minilm-int8", "logistic"), ("use-m3", "logistic"), ("e5-small-q4", "logistic"), ("minilm-int8", "rbf"),
      ("use-m3", "rbf"), ("e5-small-q4", "rbf"), (LEXICAL, "logistic"))),
    # A larger encoder (optional candidate: only when --embedders names it)
    ("all-mpnet-base-v2 + lexical", (("all-mpnet-base-v2", "logistic"), (LEXICAL, "logistic"))),
    ("all-mpnet-base-v2 (rbf) + lexical", (("all-mpnet-base-v2", "rbf"), (LEXICAL, "logistic"))),
    ("all-mpnet-base-v2 + use-m3 + lexical", (("all-mpnet-base-v2", "logistic"), ("use-m3", "logistic"),
                                              (LEXICAL, "logistic"))),
    ("all-mpnet-base-v2, use-m3, minilm-int8 (rbf) + lexical",
     (("all-mpnet-base-v2", "rbf"), ("use-m3", "rbf"), ("minilm-int8", "rbf"), (LEXICAL, "logistic"))),
)


@dataclass(frozen=True)
class View:
    """One input to a stack: dense vectors (an embedder's) or raw lexical counts (idf is fitted per training part)."""

    name: str
    x: Any
    head: str = "logistic"

    @property
    def is_lexical(self) -> bool:
        return self.name == LEXICAL


def _head(kind: str, lexical: bool) -> Any:
    if kind == "logistic":
        return LogisticRegression(C=LEXICAL_C if lexical else HEAD_C, max_iter=5000)
    if kind == "rbf":
        if lexical:
            raise ValueError("the lexical view takes a logistic head (an RBF kernel over 16,384 sparse buckets "
                             "is slow and no better)")
        return SVC(C=1.0, kernel="rbf", gamma="scale")  # deterministic: no probability=True, so no random state
    raise ValueError(f"unknown head kind {kind!r}; choose one of {HEAD_KINDS}")


def _fit_and_score(view: View, y: np.ndarray, fit_rows: np.ndarray, score_rows: np.ndarray) -> np.ndarray:
    """The view's head fitted on ``fit_rows`` (lexical idf learnt from them only): its decision values on
    ``score_rows``."""
    x = view.x
    weigh = LexicalFeatures(n_features=x.shape[1]).fit_idf(x[fit_rows]).weigh if view.is_lexical else None

    def features(rows: np.ndarray) -> Any:
        return weigh(x[rows]) if weigh is not None else x[rows]

    model = _head(view.head, view.is_lexical).fit(features(fit_rows), y[fit_rows])
    return model.decision_function(features(score_rows))


def _decisions(views: list[View], y: np.ndarray, train: np.ndarray, score: np.ndarray,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(inner out-of-fold decision values on ``train``, decision values on ``score``), one column per view."""
    inner = StratifiedKFold(n_splits=CV_FOLDS, shuffle=True, random_state=seed)
    d_train, d_score = np.zeros((len(train), len(views))), np.zeros((len(score), len(views)))
    for j, view in enumerate(views):
        for a, b in inner.split(train, y[train]):
            d_train[b, j] = _fit_and_score(view, y, train[a], train[b])
        d_score[:, j] = _fit_and_score(view, y, train, score)
    return d_train, d_score


def evaluate_stack(views: list[View], y: np.ndarray, *, seed: int = 0, target_accuracy: float = TARGET_ACCURACY,
                   confidence_z: float = CONFIDENCE_Z, folds: int = CV_FOLDS, train_fraction: float = 1.0,
                   subsample_seed: int = 0) -> dict[str, Any]:
    """Nested K-fold result of one stack on labels ``y`` (rows of every view aligned with ``y``).

    ``train_fraction`` < 1: each outer training part is cut to a random share of its rows (``subsample_seed``);
    the held-out parts stay whole, so every fraction is scored on the same rows (a learning curve)."""
    y = np.asarray(y, dtype=np.int64)
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = np.zeros(len(y))
    nested: list[dict[str, float]] = []
    weights: list[list[float]] = []
    rng = np.random.default_rng(subsample_seed)
    train_rows = []
    for train, test in outer.split(np.zeros(len(y)), y):
        if train_fraction < 1.0:
            train = np.sort(rng.permutation(train)[: int(train_fraction * len(train))])
        train_rows.append(len(train))
        d_train, d_test = _decisions(views, y, train, test, seed)
        stacker = LogisticRegression(C=1e6, max_iter=1000).fit(d_train, y[train])
        p_train = stacker.predict_proba(d_train)[:, 1]
        oof[test] = stacker.predict_proba(d_test)[:, 1]
        low, high = choose_band(p_train, y[train], target_accuracy, confidence_z)
        nested.append(band_stats(oof[test], y[test], low, high) | {"rows": int(len(test))})
        weights.append([round(float(w), 3) for w in stacker.coef_[0]])
    pooled = pool(nested)
    low, high = choose_band(oof, y, target_accuracy, 0.0)
    hindsight = band_stats(oof, y, low, high)
    return {"roc_auc": float(roc_auc_score(y, oof)), "escalation_rate": pooled["escalation_rate"],
            "auto_accuracy": pooled["auto_accuracy"], "hindsight_escalation_rate": hindsight["escalation_rate"],
            "hindsight_auto_accuracy": hindsight["auto_accuracy"], "hindsight_block_rate": hindsight["block_rate"],
            "hindsight_allow_rate": hindsight["allow_rate"], "stacker_weights_per_fold": weights,
            "train_rows_per_fold": train_rows}


def learning_curve(views: list[View], y: np.ndarray, *, fractions: tuple[float, ...] = LEARNING_FRACTIONS,
                   repeats: int = 3, whole: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The stack's results as its training rows shrink: what more in-domain rows would buy, read backwards.

    Each fraction below 1 is the mean over ``repeats`` random cuts of the training parts (one cut is noisy: a
    band moves with a handful of rows); the held-out parts are always whole. ``whole``: the stack's
    :func:`evaluate_stack` result on all rows, when already computed (it is the fraction 1 point)."""
    points = []
    keys = ("roc_auc", "escalation_rate", "auto_accuracy", "hindsight_escalation_rate")
    for fraction in fractions:
        if fraction >= 1.0:
            runs = [whole if whole is not None else evaluate_stack(views, y)]
        else:
            runs = [evaluate_stack(views, y, train_fraction=fraction, subsample_seed=r) for r in range(repeats)]
        points.append({"fraction": fraction, "train_rows": int(np.mean([np.mean(r["train_rows_per_fold"])
                                                                          for r in runs])),
                       "repeats": len(runs), **{k: float(np.mean([r[k] for r in runs])) for k in keys}})
    return points


def stack_rate(embedders: list[str], rates: dict[str, float]) -> float:
    """Texts per second of embedders run one after another: ``1 / sum(1 / rate)`` (each counted once)."""
    unique = list(dict.fromkeys(e for e in embedders if e != LEXICAL))
    return 1.0 / sum(1.0 / rates[e] for e in unique) if unique else float("inf")


def ceiling(embedders: list[str], *, datasets_dir: Path, stacks: tuple[tuple[str, tuple[tuple[str, str], ...]], ...]
            = DEFAULT_STACKS, speed_texts: int = 128, rounds: int = 2, progress: bool = True,
            short_texts: list[str] | None = None, curves: bool = True) -> dict[str, Any]:
    """Every stack in ``stacks`` whose embedders are all in ``embedders``, on the OpenAI set's ``any`` labels.

    Speed is timed on the OpenAI set's own texts (long: a median of 91 word pieces, a fifth over 256) and, given
    ``short_texts`` (the CLI passes the demo's sample traffic), on those too: ratios differ by length, because
    the baseline pads and the int8 embedder does not."""
    from triage_models.compare import time_embedders
    from triage_models.data import load_openai_moderation
    from triage_models.train import embed_with_cache

    data = load_openai_moderation(datasets_dir)
    y, rows = data.any_labels("known_zero")
    wanted = [s for s in stacks if all(v == LEXICAL or v in embedders for v, _ in s[1])]
    used = list(dict.fromkeys(v for _, spec in wanted for v, _ in spec if v != LEXICAL))
    timing = time_embedders(list(dict.fromkeys(["minilm-fp32", *used])), data.texts, speed_texts=speed_texts,
                            rounds=rounds)
    short = (time_embedders(list(timing["loaded"]), short_texts, speed_texts=speed_texts, rounds=rounds,
                            loaded=timing["loaded"]) if short_texts else None)
    matrices: dict[str, Any] = {LEXICAL: LexicalFeatures().counts(data.texts)[rows]}
    for name in used:
        x, _ = embed_with_cache(timing["loaded"][name], data.texts, progress=progress)
        matrices[name] = x.astype(np.float64)[rows]
    baseline = timing["texts_per_s"]["minilm-fp32"]
    results = []
    learning: dict[str, list[dict[str, Any]]] = {}
    for label, spec in wanted:
        started = time.perf_counter()
        views = [View(v, matrices[v], head) for v, head in spec]
        result = evaluate_stack(views, y)
        rate = stack_rate([v for v, _ in spec], timing["texts_per_s"])
        row = {"stack": label, "views": [f"{v}:{h}" for v, h in spec], **result, "texts_per_s": round(rate, 1),
               "speedup_vs_baseline": round(rate / baseline, 2), "fit_seconds": round(time.perf_counter() - started, 1)}
        if short is not None:
            short_rate = stack_rate([v for v, _ in spec], short["texts_per_s"])
            row |= {"short_texts_per_s": round(short_rate, 1),
                    "short_speedup_vs_baseline": round(short_rate / short["texts_per_s"]["minilm-fp32"], 2)}
        results.append(row)
        if curves and label in CURVE_STACKS:
            learning[label] = learning_curve(views, y, whole=result)
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dataset": "openai_moderation",
            "rows": int(len(y)), "positives": int(np.sum(y)), "target": {
                "roc_auc": TARGET_ROC_AUC, "escalation_rate": TARGET_ESCALATION, "auto_accuracy": TARGET_ACCURACY},
            "folds": f"{CV_FOLDS}-fold stratified, seed 0; bands nested (Wilson z {CONFIDENCE_Z}); hindsight band "
                     "chosen on the pooled out-of-fold probabilities (z 0)",
            "speed": {"texts": timing["texts"], "rounds": rounds, "texts_per_s": timing["texts_per_s"],
                      "short_texts_per_s": short["texts_per_s"] if short else None, "baseline": "minilm-fp32"},
            "stacks": results, "learning_curves": learning}


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| stack | ROC-AUC | nested escalation | nested auto acc. | hindsight escalation (blocked, allowed) | "
             "texts/s | x baseline | x baseline, short texts |", "|---|---|---|---|---|---|---|---|"]
    for r in report["stacks"]:
        lines.append(f"| {r['stack']} | {r['roc_auc']:.3f} | {r['escalation_rate']:.3f} | {r['auto_accuracy']:.3f} | "
                     f"{r['hindsight_escalation_rate']:.3f} ({r['hindsight_block_rate']:.3f}, "
                     f"{r['hindsight_allow_rate']:.3f}) | {r['texts_per_s']} | {r['speedup_vs_baseline']} | "
                     f"{r.get('short_speedup_vs_baseline', '')} |")
    for label, points in report.get("learning_curves", {}).items():
        lines += ["", f"Learning curve, {label}:", "", "| training rows per fold | ROC-AUC | nested escalation | "
                  "nested auto acc. | hindsight escalation |", "|---|---|---|---|---|"]
        lines += [f"| {p['train_rows']} | {p['roc_auc']:.3f} | {p['escalation_rate']:.3f} | {p['auto_accuracy']:.3f} | "
                  f"{p['hindsight_escalation_rate']:.3f} |" for p in points]
    return "\n".join(lines)
