"""The committed triage artefact and the code that loads and scores it.

Why these tests: workers trust ``model_version`` for audit and the thresholds for routing, so the artefact must
verify itself, load into :class:`TriageThresholds`, and order obviously benign and obviously violent text the
right way. The embedder loads once per module (a few seconds).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings, TriageSettings
from pipeline.router import TriageRoute, TriageThresholds, route_triage
from pipeline.triage import (
    ANY_HEAD,
    HEADS_FILE,
    MODEL_CARD_FILE,
    THRESHOLDS_FILE,
    Embedder,
    LinearHead,
    OnnxEmbedder,
    TriageArtefactError,
    TriageModel,
    content_version,
)
from pipeline.triage.model import LexicalHead
from triage_models.data import CATEGORIES, UNKNOWN, load_openai_moderation
from triage_models.heads import predict
from triage_models.train import choose_band, choose_high_risk_level

pytestmark = pytest.mark.unit

ARTEFACT = TriageSettings().model_dir
DATASETS = Settings().datasets_dir  # the shared labelled data (MODPIPE_DATASETS_DIR), read in place
POLICIES = ["sexual", "sexual_minors", "hate", "violence", "harassment", "self_harm"]
BENIGN = [
    "Thanks for the recipe! The banana bread turned out great and my kids loved it.",
    "What time does the library open on Saturday?",
]
THREATS = [
    "I know where you live. Tonight I'm going to break into your house and stab you until you stop breathing.",
    "I will kill you and your whole family, you worthless piece of garbage.",
]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


@pytest.fixture(scope="module")
def fast_embedder() -> OnnxEmbedder:
    return OnnxEmbedder()


@pytest.fixture(scope="module")
def model(fast_embedder: OnnxEmbedder) -> TriageModel:
    """The artefact with the embedder the workers run by default (its heads were trained on these vectors)."""
    return TriageModel.load(ARTEFACT, embedder=fast_embedder)


class _FakeEmbedder:
    """Deterministic stand-in with a chosen dimension: tests scoring without the real model."""

    name = "fake"

    def __init__(self, dim: int) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        rng = np.random.default_rng(len(texts))
        vectors = rng.normal(size=(len(texts), self.dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_default_artefact_loads_with_card(model: TriageModel) -> None:
    assert ARTEFACT.is_dir()
    assert model.categories == list(CATEGORIES)
    assert model.embedding_dim == 384
    assert model.embedder_name == model.embedder.name  # trained on the worker's default embedder
    assert model.embedder_name.startswith(Embedder.name + ":onnx-int8:")
    assert set(model.head_bands) == {ANY_HEAD, *CATEGORIES}
    card = json.loads((ARTEFACT / MODEL_CARD_FILE).read_text())
    assert card["data"]["sha256"] == load_openai_moderation(DATASETS).sha256
    # provenance names the file inside the datasets folder, never a machine's path
    assert card["data"]["file"] == card["data"]["sources"][0]["file"] == "openai_moderation/samples-1680.jsonl.gz"
    assert 0.5 < card["metrics"]["roc_auc"] <= 1.0
    assert set(card["metrics"]["per_category_roc_auc"]) == set(CATEGORIES)
    assert (ARTEFACT / "MODEL_CARD.md").read_text().count(card["version"]) >= 1


def test_version_is_content_hash_of_heads_and_thresholds(model: TriageModel) -> None:
    expected = content_version((ARTEFACT / HEADS_FILE).read_bytes(), (ARTEFACT / THRESHOLDS_FILE).read_bytes())
    assert model.version == expected
    assert len(expected) == 12 and int(expected, 16) >= 0
    assert json.loads((ARTEFACT / MODEL_CARD_FILE).read_text())["version"] == expected


def test_edited_thresholds_are_detected(tmp_path: Path) -> None:
    copy = tmp_path / "artefact"
    shutil.copytree(ARTEFACT, copy)
    thresholds = json.loads((copy / THRESHOLDS_FILE).read_text())
    thresholds["block_above"] = 0.99
    (copy / THRESHOLDS_FILE).write_text(json.dumps(thresholds))
    with pytest.raises(TriageArtefactError, match="inconsistent"):
        TriageModel.load(copy)
    (copy / MODEL_CARD_FILE).unlink()  # without a card there is nothing to compare against: the new hash is the version
    assert TriageModel.load(copy).thresholds.block_above == 0.99


def test_thresholds_are_valid_and_load_into_router_type(model: TriageModel) -> None:
    raw = json.loads((ARTEFACT / THRESHOLDS_FILE).read_text())
    assert set(raw) == {"allow_below", "block_above", "high_risk", "category_policies", "policy_floor",
                        "category_bands", "languages"}
    direct = TriageThresholds(**{**raw, "category_bands": {k: tuple(v) for k, v in raw["category_bands"].items()},
                                 "languages": tuple(raw["languages"])})
    assert direct == model.thresholds
    assert model.thresholds.languages == ("en",) and set(model.thresholds.category_bands) == set(CATEGORIES)
    t = model.thresholds
    assert 0.0 < t.allow_below < t.block_above < 1.0
    assert set(t.high_risk) == {"SH", "S3"}
    assert all(0.0 < level < 1.0 for level in t.high_risk.values())
    assert set(t.category_policies) == set(CATEGORIES)
    assert t.category_policies["S3"] == "sexual_minors" and t.category_policies["SH"] == "self_harm"
    assert 0.0 < t.policy_floor < 1.0


def test_benign_scores_lower_than_violent_threats(model: TriageModel) -> None:
    benign, threats = model.score(BENIGN), model.score(THREATS)
    assert max(s.violation for s in benign) < min(s.violation for s in threats)
    assert max(s.categories["V"] for s in benign) < min(s.categories["V"] for s in threats)
    assert all(s.violation > 0.5 and s.categories["V"] > 0.5 for s in threats)
    for scores in benign:
        assert route_triage(scores, model.thresholds, POLICIES).route is TriageRoute.ALLOW
    for scores in threats:
        decision = route_triage(scores, model.thresholds, POLICIES)
        assert decision.route is not TriageRoute.ALLOW
        assert "violence" in decision.policy_ids


def test_scores_carry_version_latency_and_all_categories(model: TriageModel) -> None:
    scores = model.score(BENIGN + THREATS)
    assert len(scores) == 4
    assert {s.model_version for s in scores} == {model.version}
    assert all(s.latency_ms > 0 for s in scores) and len({s.latency_ms for s in scores}) == 1
    assert all(set(s.categories) == set(CATEGORIES) for s in scores)
    assert all(0.0 <= p <= 1.0 for s in scores for p in [s.violation, *s.categories.values()])
    assert model.score([]) == []


def test_scoring_is_deterministic(model: TriageModel) -> None:
    texts = BENIGN + THREATS
    first = [(s.violation, s.categories) for s in model.score(texts)]
    second = [(s.violation, s.categories) for s in model.score(texts)]
    assert first == second
    # Batch composition changes padding, so only float noise may differ between one-by-one and batched scoring.
    alone = [model.score([t])[0].violation for t in texts]
    np.testing.assert_allclose(alone, [v for v, _ in first], atol=1e-4)


def test_fused_scoring_matches_each_stored_head(model: TriageModel, embedder: Embedder) -> None:
    raw = json.loads((ARTEFACT / HEADS_FILE).read_text())
    texts = BENIGN + THREATS
    emb = embedder.encode(texts)
    fused = model.score_embeddings(emb, texts)
    any_head = LinearHead.from_json(raw["heads"][ANY_HEAD])
    lexical = LexicalHead.from_json(raw["lexical"])  # the `any` head stacks the lexical view on the embedding
    expected = predict(any_head, emb, lexical, lexical.features.counts(texts))
    np.testing.assert_allclose([v for v, _ in fused], expected, rtol=1e-9)
    for category in CATEGORIES:
        head = LinearHead.from_json(raw["heads"][category])
        np.testing.assert_allclose([c[category] for _, c in fused], head.predict_proba(emb), rtol=1e-9)
    with pytest.raises(ValueError, match="shape"):
        model.score_embeddings(np.zeros((2, 10), dtype=np.float32))


def test_embedder_output_is_normalised_float32(embedder: Embedder) -> None:
    emb = embedder.encode(BENIGN)
    assert emb.shape == (2, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert embedder.encode([]).shape == (0, 384)


def test_missing_artefact_gives_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-artefact"
    with pytest.raises(TriageArtefactError, match="no-such-artefact.*does not exist"):
        TriageModel.load(missing)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(ARTEFACT / THRESHOLDS_FILE, partial / THRESHOLDS_FILE)
    with pytest.raises(TriageArtefactError, match=r"heads\.json is missing"):
        TriageModel.load(partial)


def test_corrupt_artefact_gives_clear_error(tmp_path: Path) -> None:
    copy = tmp_path / "artefact"
    shutil.copytree(ARTEFACT, copy)
    (copy / MODEL_CARD_FILE).unlink()
    (copy / HEADS_FILE).write_text("{not json")
    with pytest.raises(TriageArtefactError, match="not valid JSON"):
        TriageModel.load(copy)
    raw = json.loads((ARTEFACT / HEADS_FILE).read_text())
    raw["heads"]["S"]["coef"] = raw["heads"]["S"]["coef"][:10]
    (copy / HEADS_FILE).write_text(json.dumps(raw))
    with pytest.raises(TriageArtefactError, match="malformed"):
        TriageModel.load(copy)


def test_embedder_of_wrong_dimension_is_refused() -> None:
    with pytest.raises(TriageArtefactError, match="384"):
        TriageModel.load(ARTEFACT, embedder=_FakeEmbedder(dim=8))
    model = TriageModel.load(ARTEFACT, embedder=_FakeEmbedder(dim=384))  # another name only warns
    assert len(model.score(["x", "y"])) == 2


def test_loader_keeps_unknown_labels_unknown() -> None:
    data = load_openai_moderation(DATASETS)
    assert len(data) == 1680
    assert (data.labels["H"] == UNKNOWN).sum() == 1680 - 771
    y, rows = data.any_labels("known_zero")
    assert len(rows) == 1680 and int(y.sum()) == 522
    y_complete, rows_complete = data.any_labels("complete")
    assert int(y_complete.sum()) == 522 and len(rows_complete) == 522 + 337


def test_choose_band_reaches_target_with_least_escalation() -> None:
    p = np.array([0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95])
    y = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    allow_below, block_above = choose_band(p, y, target_accuracy=1.0, confidence_z=0.0)
    assert (allow_below, block_above) == pytest.approx((0.3, 0.7))  # only 0.4 and 0.6 escalate
    # 7 of 8 right: no escalation
    assert choose_band(p, y, target_accuracy=0.75, confidence_z=0.0) == pytest.approx((0.3, 0.3))
    assert choose_band(np.array([0.5, 0.5]), np.array([0, 1]), target_accuracy=0.9, confidence_z=0.0) == (0.0, 1.0)


def test_high_risk_level_catches_the_requested_recall() -> None:
    p = np.linspace(0.01, 0.99, 100)
    y = (np.arange(100) % 2).astype(np.int8)
    level = choose_high_risk_level(p, y, recall=0.9)
    assert (p[y == 1] >= level).mean() >= 0.9
    assert level > 0.05
