"""Training: reviewer feedback, unknown labels, nested thresholds with a margin, and what the artefact records.

Why: the threshold band is what lets triage decide without a human; it must be chosen without looking at the rows
it is scored on, and reviewer feedback must flow into training without inventing labels nobody gave. A small
deterministic fake embedder keeps these tests fast: they check the procedure, not the model's quality.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

import triage_models.train as train_module
from pipeline.config import Settings
from pipeline.triage import ANY_HEAD, TriageModel
from triage_models.data import (
    CATEGORIES,
    UNKNOWN,
    DatasetNotFoundError,
    load_dataset,
    load_feedback,
    load_hatecheck,
    load_openai_moderation,
    load_xstest,
)
from triage_models.train import band_stats, choose_band, wilson_lower

pytestmark = pytest.mark.unit
DATASETS = Settings().datasets_dir  # the shared labelled data (MODPIPE_DATASETS_DIR), read in place

CUES = ("kill", "die", "sex", "hate", "stupid", "fuck", "shit", "cut", "gun", "nigg", "porn", "rape")


def _known_labels() -> dict[str, int]:
    data = load_openai_moderation(DATASETS)
    y, rows = data.any_labels()
    return {data.texts[r]: int(v) for r, v in zip(rows, y, strict=True)}


class _KeywordEmbedder:
    """Deterministic 16-d vectors: a noisy copy of the known label (so bands can decide some items), keyword
    counts, and text-hash noise. It tests the training procedure, not a model."""

    name = "fake-keywords"
    dim = 16
    max_seq_length = 256
    _labels: dict[str, int] = {}  # noqa: RUF012 - filled once, shared on purpose

    def fingerprint(self) -> str:
        return "fake-keywords-v2"

    def encode(self, texts: list[str]) -> np.ndarray:
        if not _KeywordEmbedder._labels:
            _KeywordEmbedder._labels = _known_labels()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, text in enumerate(texts):
            low = text.lower()
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")
            noise = np.random.default_rng(seed).normal(size=self.dim)
            out[i] = 0.3 * noise
            out[i, 0] += self._labels.get(text, 0) * 1.0
            out[i, 1 : 1 + len(CUES)] += [low.count(c) for c in CUES]
            out[i] /= np.linalg.norm(out[i]) or 1.0
        return out


def _write_feedback(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


FEEDBACK = [
    {"text": "you should just cut yourself, nobody would miss you", "label": 1, "categories": {"SH": 1, "HR": 1},
     "policy_id": "self_harm", "rule_id": "SH1", "source": "review", "decided_at": "2025-01-02T10:00:00+00:00"},
    {"text": "great match last night, what a goal", "label": 0, "source": "review",
     "decided_at": "2025-01-02T10:00:00+00:00"},
    {"text": "great match last night, what a goal", "label": 1, "source": "review",
     "decided_at": "2025-01-01T10:00:00+00:00"},  # older decision on the same text: the later one wins
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    tmp = tmp_path_factory.mktemp("train")
    feedback = _write_feedback(tmp / "feedback.jsonl", FEEDBACK)
    mp = pytest.MonkeyPatch()
    mp.setattr(train_module, "make_embedder", lambda *a, **k: _KeywordEmbedder())
    try:
        card = train_module.train(tmp / "artefact", datasets_dir=DATASETS, progress=False, cache_dir=tmp / "cache",
                                  feedback=feedback, extra_sources=[])
    finally:
        mp.undo()
    return tmp / "artefact", card


def test_feedback_loader_keeps_unstated_categories_unknown(tmp_path: Path) -> None:
    data = load_feedback(_write_feedback(tmp_path / "f.jsonl", FEEDBACK))
    assert len(data) == 2  # two distinct texts
    first = data.texts.index(FEEDBACK[0]["text"])
    second = data.texts.index(FEEDBACK[1]["text"])
    assert data.labels["SH"][first] == 1 and data.labels["HR"][first] == 1 and data.labels["S"][first] == UNKNOWN
    assert all(data.labels[c][second] == UNKNOWN for c in CATEGORIES)
    y, rows = data.any_labels()
    assert dict(zip(rows.tolist(), y.tolist(), strict=True)) == {first: 1, second: 0}  # latest decision wins


@pytest.mark.parametrize(
    "bad_line",
    ['{"text": 3, "label": 1}', '{"text": "x", "label": 2}', '{"text": "x", "label": 1, "categories": {"ZZ": 1}}',
     "not json"],
)
def test_malformed_feedback_names_the_line(tmp_path: Path, bad_line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(FEEDBACK[1]) + "\n" + bad_line + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_feedback(path)


def test_binary_only_sets_have_unknown_categories_and_a_binary_label() -> None:
    xstest = load_xstest(DATASETS)
    y, rows = xstest.any_labels()
    assert len(xstest) == len(rows) == 450 and int(y.sum()) == 200
    assert all((xstest.labels[c] == UNKNOWN).all() for c in CATEGORIES)
    assert load_dataset("xstest", DATASETS).sha256 == xstest.sha256
    with pytest.raises(FileNotFoundError, match="neither a data set name"):
        load_dataset("no-such-set", DATASETS)
    hatecheck = load_hatecheck(DATASETS)
    assert len(hatecheck) == 3728 and hatecheck.sources[0]["file"] == "hatecheck/test_suite_cases.csv"
    assert xstest.sources[0]["file"] == "xstest/xstest_prompts.csv"  # relative to the datasets folder


def test_missing_datasets_folder_names_the_setting_and_the_path(tmp_path: Path) -> None:
    absent = tmp_path / "no-datasets-here"
    for loader in (load_openai_moderation, load_xstest, load_hatecheck):
        with pytest.raises(DatasetNotFoundError, match="MODPIPE_DATASETS_DIR") as caught:
            loader(absent)
        assert str(absent) in str(caught.value)
    with pytest.raises(FileNotFoundError, match="MODPIPE_DATASETS_DIR"):
        load_dataset("openai_moderation", absent)
    with pytest.raises(FileNotFoundError, match="MODPIPE_DATASETS_DIR"):
        train_module.train(tmp_path / "a", datasets_dir=absent, progress=False, cache_dir=tmp_path / "cache")


def test_missing_file_in_the_datasets_folder_names_the_file_and_the_setting(tmp_path: Path) -> None:
    (tmp_path / "xstest").mkdir()  # the folder exists, the file does not
    with pytest.raises(DatasetNotFoundError, match=r"xstest/xstest_prompts\.csv.*MODPIPE_DATASETS_DIR") as caught:
        load_xstest(tmp_path)
    assert str(tmp_path / "xstest" / "xstest_prompts.csv") in str(caught.value)


def test_wilson_bound_is_below_the_observed_rate_and_tightens_with_more_rows() -> None:
    small, large = wilson_lower(np.array([97]), np.array([100]), 1.645), wilson_lower(np.array([970]), np.array([1000]), 1.645)
    assert small[0] < large[0] < 0.97
    assert wilson_lower(np.array([97]), np.array([100]), 0.0)[0] == pytest.approx(0.97)


def test_margin_makes_the_band_stricter_than_the_plain_rule() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 2000)
    p = np.clip(y * 0.35 + rng.uniform(0, 0.65, 2000), 0, 1)
    plain = band_stats(p, y, *choose_band(p, y, 0.97, confidence_z=0.0))
    margin = band_stats(p, y, *choose_band(p, y, 0.97, confidence_z=1.645))
    assert plain["auto_accuracy"] >= 0.97 and margin["auto_accuracy"] >= plain["auto_accuracy"]
    assert margin["escalation_rate"] >= plain["escalation_rate"]


def test_training_uses_feedback_and_records_it(trained: tuple[Path, dict]) -> None:
    artefact, card = trained
    base = load_openai_moderation(DATASETS)
    assert card["data"]["rows"] == len(base) + 2
    names = [s["name"] for s in card["data"]["sources"]]
    assert names == ["openai_moderation", "feedback"]
    assert card["data"]["sources"][0]["sha256"] == base.sha256
    assert card["data"]["sources"][0]["file"] == card["data"]["file"] == "openai_moderation/samples-1680.jsonl.gz"
    assert card["data"]["sources"][1]["file"] == "feedback.jsonl"
    assert str(DATASETS) not in json.dumps(card) and str(artefact.parent) not in json.dumps(card)  # no machine paths
    assert card["data"]["category_rows"]["SH"] == int((base.labels["SH"] != UNKNOWN).sum()) + 1
    assert card["embedder"]["name"] == "fake-keywords"


def test_bands_are_nested_per_head_and_recorded(trained: tuple[Path, dict]) -> None:
    _, card = trained
    metrics = card["metrics"]
    folds = metrics["nested_folds"]
    assert len(folds) == 5 and sum(f["rows"] for f in folds) == card["data"]["any_rows"]
    decided = sum(f["auto_decided"] for f in folds)
    assert metrics["escalation_rate"] == pytest.approx(1 - decided / card["data"]["any_rows"])
    assert decided > 0
    assert metrics["auto_accuracy"] == pytest.approx((decided - sum(f["auto_errors"] for f in folds)) / decided)
    assert metrics["target_met"] == (metrics["auto_accuracy"] >= 0.97)
    assert all(f["allow_below"] <= f["block_above"] for f in folds)
    assert set(card["thresholds"]["head_bands"]) == {ANY_HEAD, *CATEGORIES}
    for category in CATEGORIES:
        nested = metrics["per_category"][category]["nested_band"]
        assert 0.0 <= nested["escalation_rate"] <= 1.0


def test_artefact_is_small_versioned_and_loads(trained: tuple[Path, dict]) -> None:
    artefact, card = trained
    model = TriageModel.load(artefact, embedder=_KeywordEmbedder())
    assert model.version == card["version"] and len(card["version"]) == 12
    assert sum((artefact / f).stat().st_size for f in ("heads.json", "thresholds.json")) < 5_000_000
    assert set(model.thresholds.high_risk) == {"SH", "S3"}  # forced to escalate rather than auto-block
    assert model.head_bands[ANY_HEAD] == (model.thresholds.allow_below, model.thresholds.block_above)
    scores = model.score(["I will kill you", "nice weather today"])
    assert all(s.model_version == model.version for s in scores)
    assert f"`{card['version']}`" in (artefact / "MODEL_CARD.md").read_text()


def test_high_risk_override_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "make_embedder", lambda *a, **k: _KeywordEmbedder())
    card = train_module.train(tmp_path / "a", datasets_dir=DATASETS, progress=False, cache_dir=tmp_path / "cache",
                              high_risk_recall={}, extra_sources=[], lexical=False, nested=False)
    assert card["thresholds"]["high_risk"] == {}


def test_artefact_records_priors_lexical_view_category_bands_and_languages(trained: tuple[Path, dict]) -> None:
    artefact, card = trained
    model = TriageModel.load(artefact, embedder=_KeywordEmbedder())
    assert model.lexical is not None and card["heads"]["any_lexical"]["weights"]["lexical"] == model.lexical.weight
    assert set(model.train_priors) == {ANY_HEAD, *CATEGORIES}
    assert model.train_priors[ANY_HEAD] == pytest.approx(card["data"]["any_positives"] / card["data"]["any_rows"])
    assert model.thresholds.languages == ("en",)
    assert set(model.thresholds.category_bands) == set(CATEGORIES)
    assert all(allow == 1.0 for allow, _ in model.thresholds.category_bands.values())  # "block" routing
    route = card["metrics"]["route"]
    assert 0 <= route["escalation_rate"] <= 1 and set(card["metrics"]["route_by_category_mode"]) == {
        "none", "block", "both"}


def test_extra_sources_train_the_maps_but_never_calibrate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "make_embedder", lambda *a, **k: _KeywordEmbedder())
    card = train_module.train(tmp_path / "a", datasets_dir=DATASETS, progress=False, cache_dir=tmp_path / "cache",
                              extra_sources=["convabuse"], nested=False, lexical=False)
    assert card["data"]["extra_rows"] > 3000 and card["data"]["extra_sources"][0]["name"] == "convabuse:train"
    assert card["data"]["rows"] == 1680  # calibration rows: the OpenAI set only
    assert card["train_priors"][ANY_HEAD] == pytest.approx(522 / 1680, abs=0.01)


def test_card_compares_with_the_previous_artefact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  trained: tuple[Path, dict]) -> None:
    previous, old = trained
    monkeypatch.setattr(train_module, "make_embedder", lambda *a, **k: _KeywordEmbedder())
    card = train_module.train(tmp_path / "b", datasets_dir=DATASETS, progress=False, cache_dir=tmp_path / "cache",
                              extra_sources=[], nested=False, lexical=False, previous_dir=previous)
    assert card["comparison"]["previous"]["version"] == old["version"]
    assert card["comparison"]["delta"]["roc_auc"] == pytest.approx(card["metrics"]["roc_auc"] - old["metrics"]["roc_auc"])
    assert f"previous `{old['version']}`" in (tmp_path / "b" / "MODEL_CARD.md").read_text()
