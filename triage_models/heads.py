"""Fitting the triage heads and choosing their bands: the statistics, apart from the recipe in ``train``.

Why it is built this way:

* Every head is a logistic regression with Platt calibration fitted on inner cross-validated decision values
  (what ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` does). A calibrated linear head is still
  one affine map, so the artefact is a few numbers per head in JSON, safe to load and tiny.
* Rows come in two kinds. *Calibration rows* (the OpenAI set, reviewer feedback, learning rows from the
  pipeline's own verdicts) are what the head is calibrated and its band chosen on: their base rate is the one the
  probabilities mean. *Extra rows* (other public sets, :mod:`triage_models.sources`) only teach the linear
  map, with a total weight of ``extra_weight`` times the calibration rows', so a 15,000-row corpus of tweets
  cannot swamp the anchor set or move the calibration.
* The ``any`` head may stack two views: the embedding and hashed character n-grams
  (:mod:`pipeline.triage.lexical`). Each view gets its own logistic regression; a two-input logistic stacker
  fitted on their inner out-of-fold decision values calibrates and weighs them together.
* Bands are chosen on out-of-fold probabilities, never on the rows a model saw, with a Wilson lower bound as the
  margin; the nested estimate chooses the band inside each outer training fold and scores the held-out fold.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from pipeline.triage import LinearHead
from pipeline.triage.lexical import LexicalFeatures
from pipeline.triage.model import LexicalHead

CV_FOLDS = 5
HEAD_C = 1.0  # inverse L2 strength; 1.0 was best or tied on CV AUC among 0.5..16 (mean over heads)
LEXICAL_C = 4.0  # the lexical view is sparse and wide: weaker regularisation (best of 1, 4, 16 on the OpenAI set)
CONFIDENCE_Z = 1.645  # one-sided 95 % Wilson bound on auto-decided accuracy when choosing a band
MIN_CLASS_ROWS = 5


@dataclass
class HeadRows:
    """The rows one head trains on: calibration rows (indices into the calibration set) and extra rows."""

    rows: np.ndarray
    y: np.ndarray
    extra_x: np.ndarray | None = None  # embeddings of extra rows known for this head
    extra_y: np.ndarray | None = None
    extra_counts: Any = None  # lexical counts of those rows (the `any` head only)


def _weights(n_calib: int, n_extra: int, extra_weight: float) -> np.ndarray:
    extra = extra_weight * n_calib / n_extra if n_extra else 0.0
    return np.r_[np.ones(n_calib), np.full(n_extra, extra)]


def _lr(c: float, seed: int) -> LogisticRegression:
    del seed  # lbfgs is deterministic; kept so every fit names the seed it belongs to
    return LogisticRegression(C=c, max_iter=5000)


def _fit_decision(x: np.ndarray, y: np.ndarray, ex: np.ndarray | None, ey: np.ndarray | None, extra_weight: float,
                  c: float, seed: int, sparse: bool = False) -> LogisticRegression:
    if ex is None or ey is None or len(ey) == 0 or extra_weight <= 0:
        return _lr(c, seed).fit(x, y)
    from scipy.sparse import vstack

    stacked = vstack([x, ex]).tocsr() if sparse else np.concatenate([x, ex])
    return _lr(c, seed).fit(stacked, np.r_[y, ey], sample_weight=_weights(len(y), len(ey), extra_weight))


def _inner_folds(y: np.ndarray, seed: int) -> StratifiedKFold:
    folds = int(min(CV_FOLDS, np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise ValueError(f"need at least 2 positives and 2 negatives to fit a head, got {np.bincount(y)}")
    return StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)


def fit_head(x: np.ndarray, y: np.ndarray, *, seed: int, c: float = HEAD_C, extra_x: np.ndarray | None = None,
             extra_y: np.ndarray | None = None, extra_weight: float = 0.0) -> tuple[LinearHead, np.ndarray]:
    """A Platt-calibrated logistic regression and its inner out-of-fold calibrated probabilities on ``x``.

    Extra rows (``extra_x``, ``extra_y``) join every fit with ``extra_weight`` of the calibration rows' total
    weight; calibration and the returned probabilities use the calibration rows only.
    """
    decision = np.zeros(len(y))
    for a, b in _inner_folds(y, seed).split(x, y):
        decision[b] = _fit_decision(x[a], y[a], extra_x, extra_y, extra_weight, c, seed).decision_function(x[b])
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(decision[:, None], y)
    base = _fit_decision(x, y, extra_x, extra_y, extra_weight, c, seed)
    head = LinearHead(coef=base.coef_[0].astype(np.float64), intercept=float(base.intercept_[0]),
                      platt_a=float(platt.coef_[0, 0]), platt_b=float(platt.intercept_[0]))
    return head, 1.0 / (1.0 + np.exp(-(head.platt_a * decision + head.platt_b)))


def fit_stacked_head(x: np.ndarray, counts: Any, y: np.ndarray, *, seed: int, extra_x: np.ndarray | None = None,
                     extra_counts: Any = None, extra_y: np.ndarray | None = None, extra_weight: float = 0.0,
                     features: LexicalFeatures | None = None) -> tuple[LinearHead, LexicalHead, np.ndarray]:
    """The ``any`` head over both views: (embedding part, lexical part, inner out-of-fold probabilities).

    idf weights are learnt from the training texts (calibration + extra rows) of this fit only.
    """
    from scipy.sparse import vstack

    features = (features or LexicalFeatures()).fit_idf(vstack([counts, extra_counts]) if extra_counts is not None
                                                       else counts)
    h = features.weigh(counts)
    eh = features.weigh(extra_counts) if extra_counts is not None else None
    d_emb, d_lex = np.zeros(len(y)), np.zeros(len(y))
    for a, b in _inner_folds(y, seed).split(x, y):
        d_emb[b] = _fit_decision(x[a], y[a], extra_x, extra_y, extra_weight, HEAD_C, seed).decision_function(x[b])
        d_lex[b] = _fit_decision(h[a], y[a], eh, extra_y, extra_weight, LEXICAL_C, seed,
                                 sparse=True).decision_function(h[b])
    stacker = LogisticRegression(C=1e6, max_iter=1000).fit(np.c_[d_emb, d_lex], y)
    a_emb, a_lex = (float(v) for v in stacker.coef_[0])
    bias = float(stacker.intercept_[0])
    emb_model = _fit_decision(x, y, extra_x, extra_y, extra_weight, HEAD_C, seed)
    lex_model = _fit_decision(h, y, eh, extra_y, extra_weight, LEXICAL_C, seed, sparse=True)
    head = LinearHead(coef=emb_model.coef_[0].astype(np.float64), intercept=float(emb_model.intercept_[0]),
                      platt_a=a_emb, platt_b=bias)
    lexical = LexicalHead(features=features, coef=lex_model.coef_[0].astype(np.float64),
                          intercept=float(lex_model.intercept_[0]), weight=a_lex)
    p = 1.0 / (1.0 + np.exp(-(a_emb * d_emb + a_lex * d_lex + bias)))
    return head, lexical, p


def predict(head: LinearHead, x: np.ndarray, lexical: LexicalHead | None = None, counts: Any = None) -> np.ndarray:
    """Calibrated probabilities of a fitted head (and its lexical part, given the texts' raw counts)."""
    z = head.platt_a * (np.asarray(x, dtype=np.float64) @ head.coef + head.intercept) + head.platt_b
    if lexical is not None:
        z = z + lexical.weight * (lexical.features.weigh(counts) @ lexical.coef + lexical.intercept)
    return 1.0 / (1.0 + np.exp(-z))


def wilson_lower(correct: np.ndarray, n: np.ndarray, z: float) -> np.ndarray:
    """Lower end of the Wilson score interval for a proportion (``z`` = 1.645: one-sided 95 %)."""
    n = np.asarray(n, dtype=np.float64)
    safe_n = np.maximum(n, 1.0)
    phat = np.asarray(correct, dtype=np.float64) / safe_n
    centre = phat + z * z / (2 * safe_n)
    spread = z * np.sqrt(phat * (1 - phat) / safe_n + z * z / (4 * safe_n * safe_n))
    return np.where(n > 0, (centre - spread) / (1 + z * z / safe_n), 0.0)


def choose_band(p: np.ndarray, y: np.ndarray, target_accuracy: float,
                confidence_z: float = CONFIDENCE_Z) -> tuple[float, float]:
    """(allow_below, block_above) that escalate the fewest items while auto-decided ones reach the target accuracy.

    Items with ``p < allow_below`` are allowed, ``p >= block_above`` blocked, the rest escalated. Cuts lie midway
    between neighbouring observed probabilities. Ties are broken towards fewer errors. If no band reaches the
    target, everything escalates: (0.0, 1.0).

    The margin: a band qualifies when the *lower confidence bound* (Wilson, ``confidence_z``) of its auto-decided
    accuracy reaches the target, not the observed accuracy. Choosing the band that just reaches the target on the
    rows it was chosen on overfits them (v1: 0.970 on selection rows, 0.965 nested); the bound's margin shrinks
    as more labelled rows arrive. ``confidence_z=0`` gives the plain rule.
    """
    order = np.argsort(p, kind="stable")
    ps, ys = p[order], y[order].astype(np.int64)
    values = np.unique(ps)
    cuts = np.concatenate([[0.0], (values[:-1] + values[1:]) / 2.0, [1.0]])
    idx = np.searchsorted(ps, cuts, side="left")  # items strictly below each cut
    pos_cum = np.concatenate([[0], np.cumsum(ys)])
    n, n_pos = len(ps), int(ys.sum())
    below, errors_below = idx, pos_cum[idx]  # allowed items, allowed positives
    above, errors_above = n - idx, (n - idx) - (n_pos - pos_cum[idx])  # blocked items, blocked negatives
    auto = below[:, None] + above[None, :]
    errors = errors_below[:, None] + errors_above[None, :]
    feasible = np.triu(np.ones((len(cuts), len(cuts)), dtype=bool)) & (auto > 0)
    if confidence_z > 0:
        feasible &= wilson_lower(auto - errors, auto, confidence_z) >= target_accuracy - 1e-12
    else:
        feasible &= errors <= (1.0 - target_accuracy) * auto + 1e-9
    if not feasible.any():
        return 0.0, 1.0
    score = np.where(feasible, auto * (n + 1) - errors, -1)
    i, j = np.unravel_index(int(np.argmax(score)), score.shape)
    return float(cuts[i]), float(cuts[j])


def choose_block_level(p: np.ndarray, y: np.ndarray, target_accuracy: float,
                       confidence_z: float = CONFIDENCE_Z) -> float:
    """Lowest level whose ``p >= level`` blocks with precision whose Wilson lower bound reaches the target.

    What a category band's block side needs: when a category head alone blocks an item, the item must really
    violate (its allow side is another question). 1.0 (never blocks) when no level qualifies, as for rare
    categories whose few positives cannot prove the precision.
    """
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order].astype(np.int64)
    tp = np.cumsum(ys)
    n = np.arange(1, len(ps) + 1)
    ok = wilson_lower(tp, n, confidence_z) >= target_accuracy - 1e-12
    # only cut between distinct values: the last index of each run of equal scores
    last = np.r_[ps[1:] != ps[:-1], True]
    ok &= last
    if not ok.any():
        return 1.0
    i = int(np.flatnonzero(ok)[-1])
    below = ps[i + 1] if i + 1 < len(ps) else 0.0
    return float((ps[i] + below) / 2.0)


def band_stats(p: np.ndarray, y: np.ndarray, allow_below: float, block_above: float) -> dict[str, float]:
    allow, block = p < allow_below, p >= block_above
    auto = allow | block
    correct = (allow & (y == 0)) | (block & (y == 1))
    return {"auto_accuracy": float(correct.sum() / auto.sum()) if auto.any() else float("nan"),
            "escalation_rate": float(1.0 - auto.mean()), "allow_rate": float(allow.mean()),
            "block_rate": float(block.mean()), "auto_decided": int(auto.sum()),
            "auto_errors": int((auto & ~correct).sum())}


def choose_high_risk_level(p: np.ndarray, y: np.ndarray, recall: float) -> float:
    """Highest level whose ``p >= level`` still catches ``recall`` of the positives (rounded down to 1e-4)."""
    positives = np.sort(p[y == 1])
    if len(positives) == 0:
        raise ValueError("no positives to set a high-risk level from")
    level = positives[int(np.floor((1.0 - recall) * len(positives)))]
    return float(np.floor(level * 1e4) / 1e4)


def pool(folds: list[dict[str, float]]) -> dict[str, float]:
    decided = sum(f["auto_decided"] for f in folds)
    errors = sum(f["auto_errors"] for f in folds)
    rows = sum(f["rows"] for f in folds)
    return {"auto_accuracy": (decided - errors) / decided if decided else float("nan"),
            "escalation_rate": 1.0 - decided / rows if rows else float("nan"), "auto_decided": decided,
            "auto_errors": errors}
