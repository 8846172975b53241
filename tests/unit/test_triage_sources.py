"""The extra labelled sources, the realistic-traffic mix, the lexical view and the format-2 artefact.

Why: extra data only helps when each source's labels are mapped onto the policy taxonomy where they are
unambiguous, evaluation-only rows never reach training, and the mix that measures escalation on realistic traffic
is the same on every machine. The lexical view and the format-2 artefact must score in the worker exactly what
training fitted.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Settings
from pipeline.router import TriageThresholds
from pipeline.triage import ANY_HEAD, LinearHead, TriageModel, write_artefact
from pipeline.triage.lexical import LexicalFeatures
from pipeline.triage.model import LexicalHead, ScoredText
from triage_models import sources
from triage_models.data import ANY_DROP, UNKNOWN, load_dataset
from triage_models.heads import predict
from triage_models.mix import load_realistic_mix, multilingual_sets, stable_order

pytestmark = pytest.mark.unit
DATASETS = Settings().datasets_dir


def test_davidson_maps_hate_and_neither_and_drops_offensive() -> None:
    train, test = sources.load_davidson(DATASETS, "train"), sources.load_davidson(DATASETS, "test")
    assert set(train.texts).isdisjoint(test.texts)
    assert len(train) + len(test) == 1430 + 4163  # hate + neither; the 19,190 offensive-only tweets are dropped
    hate = train.labels["H"] == 1
    assert np.all(train.any_override[hate] == 1) and np.all(train.any_override[~hate] == 0)
    assert np.all(train.labels["V"] == UNKNOWN)


def test_edos_not_sexist_is_never_an_any_row_and_splits_follow_the_source() -> None:
    edos = sources.load_edos(DATASETS, "train")
    not_sexist = edos.labels["H"] == 0
    assert np.all(edos.any_override[not_sexist] == ANY_DROP)
    y, rows = edos.any_labels()
    assert y.all() and len(rows) == int((edos.labels["H"] == 1).sum())
    assert set(edos.texts).isdisjoint(sources.load_edos(DATASETS, "test").texts)


def test_convabuse_majority_abusive_is_harassment() -> None:
    data = sources.load_convabuse(DATASETS, "train")
    y, rows = data.any_labels()
    assert len(rows) == len(data) and 0.1 < y.mean() < 0.2
    assert np.array_equal(data.labels["HR"][rows], y)


def test_evaluation_only_sets_never_train() -> None:
    assert set(sources.TRAINING_SOURCES).isdisjoint(sources.EVALUATION_SETS)
    assert all(role == "evaluation" for name, role in sources.ROLES.items() if name.endswith("_test"))
    train_texts = {t for s in sources.load_training_sources(DATASETS) for t in s.texts}
    mix = load_realistic_mix(DATASETS)
    assert train_texts.isdisjoint(mix.texts)


def test_realistic_mix_is_low_rate_stable_and_keeps_its_sources() -> None:
    mix = load_realistic_mix(DATASETS)
    y, rows = mix.any_labels()
    assert len(rows) == len(mix) > 10_000 and 0.02 <= y.mean() <= 0.10
    assert [s["name"] for s in mix.sources] == ["wiki_toxicity:gn", "convabuse:test", "davidson:test"]
    again = load_dataset("realistic_mix", DATASETS)
    assert again.texts == mix.texts and again.sha256 == mix.sha256
    assert list(stable_order(["b", "a", "c"])) == list(stable_order(["b", "a", "c"]))


def test_multilingual_samples_cover_each_language() -> None:
    sets = multilingual_sets(DATASETS, rows=50)
    assert {"mhc:de", "mhc:zh", "germeval:de", "dkhate:da", "cold:zh"} <= set(sets)
    assert all(len(s) == 50 for s in sets.values())
    assert sets["mhc:de"].sources[0]["language"] == "de"


def test_lexical_features_are_deterministic_and_normalised() -> None:
    texts = ["Go kill yourself, loser!!", "how do I kill a python process", ""]
    features = LexicalFeatures().fit_idf(LexicalFeatures().counts(texts))
    a, b = features.transform(texts), LexicalFeatures.from_json(features.to_json()).transform(texts)
    assert np.allclose(a.toarray(), b.toarray(), atol=1e-6)
    norms = np.sqrt(np.asarray(a.multiply(a).sum(axis=1))).ravel()
    assert np.allclose(norms[:2], 1.0) and norms[2] == 0.0


def test_format_two_artefact_scores_what_training_fitted(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim = 8
    texts = ["you are vermin", "nice goal", "I will hurt you", "lovely day"]
    counts = LexicalFeatures(n_features=2**10).counts(texts)
    features = LexicalFeatures(n_features=2**10).fit_idf(counts)
    lexical = LexicalHead(features=features, coef=rng.normal(size=2**10), intercept=-0.2, weight=0.7)
    heads = {ANY_HEAD: LinearHead(rng.normal(size=dim), 0.1, 1.2, -0.3),
             "H": LinearHead(rng.normal(size=dim), -0.4, 0.9, 0.1)}
    thresholds = TriageThresholds(allow_below=0.1, block_above=0.9, category_policies={"H": "hate"},
                                  category_bands={"H": (1.0, 0.8)}, languages=("en",))
    write_artefact(tmp_path, heads=heads, thresholds=thresholds, embedder_name="fake", embedding_dim=dim,
                   lexical=lexical, train_priors={ANY_HEAD: 0.3, "H": 0.1})
    emb = rng.normal(size=(4, dim))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    model = TriageModel.load(tmp_path)
    raw = model.raw_probabilities(emb, texts)
    assert np.allclose(raw[:, 0], predict(heads[ANY_HEAD], emb, lexical, counts))
    assert model.thresholds.category_bands == {"H": (1.0, 0.8)} and model.thresholds.languages == ("en",)
    assert model.train_priors == {ANY_HEAD: 0.3, "H": 0.1}
    with pytest.raises(ValueError):
        model.raw_probabilities(emb)  # the lexical view needs the texts
    adapter = model.attach_prior(mode="fixed", fixed_prior=0.03, min_items=2, update_every=2, miss_budget=0.5)
    assert np.all(model.corrected(raw)[:, 0] < raw[:, 0])
    assert adapter is not None and adapter.allow_cap is not None  # observed 4 items: the cap is in force
    assert model.thresholds.allow_below == min(0.1, adapter.allow_cap)
    assert model.base_thresholds.allow_below == 0.1


def test_scores_carry_the_detected_language_off_the_wire(tmp_path: Path) -> None:
    class Fake:
        name, dim = "fake", 4

        def encode(self, texts: list[str]) -> np.ndarray:
            return np.tile(np.asarray([0.5, 0.5, 0.5, 0.5], dtype=np.float32), (len(texts), 1))

    heads = {ANY_HEAD: LinearHead(np.zeros(4), 0.0, 1.0, -3.0)}
    write_artefact(tmp_path, heads=heads, embedder_name="fake", embedding_dim=4,
                   thresholds=TriageThresholds(allow_below=0.1, block_above=0.9, languages=("en",)))
    model = TriageModel.load(tmp_path, embedder=Fake())
    german, english, short = model.score(["Ich hasse diese Leute, sie sollten alle verschwinden.",
                                          "I really enjoyed the match last night, what a goal", "ok"])
    assert isinstance(german, ScoredText) and german.language == "de"
    assert english.language == "en" and short.language is None
    assert "language" not in german.model_dump_json()
