"""The ceiling measurement (``modpipe triage ceiling``): stacks of views, RBF heads, hindsight bands, stack speed."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.triage.lexical import LexicalFeatures
from triage_models.ceiling import LEXICAL, View, evaluate_stack, learning_curve, stack_rate


def _two_halves(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels that depend on two independent signals, each seen by one view only."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=n), rng.normal(size=n)
    y = (a + b + 0.3 * rng.normal(size=n) > 0.8).astype(np.int64)
    view_a = np.c_[a, rng.normal(size=(n, 7))]
    view_b = np.c_[b, rng.normal(size=(n, 7))]
    return view_a, view_b, y


def test_a_stack_of_two_views_beats_either_view_alone() -> None:
    view_a, view_b, y = _two_halves()
    alone_a = evaluate_stack([View("a", view_a)], y)
    alone_b = evaluate_stack([View("b", view_b)], y)
    both = evaluate_stack([View("a", view_a), View("b", view_b)], y)
    assert both["roc_auc"] > max(alone_a["roc_auc"], alone_b["roc_auc"]) + 0.05
    assert all(w > 0 for fold in both["stacker_weights_per_fold"] for w in fold)  # both views carry signal


def test_an_rbf_head_reads_what_a_linear_one_cannot() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 4))
    y = (np.linalg.norm(x[:, :2], axis=1) > 1.2).astype(np.int64)  # a ring: no hyperplane separates it
    linear = evaluate_stack([View("x", x, "logistic")], y)
    rbf = evaluate_stack([View("x", x, "rbf")], y)
    assert linear["roc_auc"] < 0.7
    assert rbf["roc_auc"] > 0.9
    assert rbf["escalation_rate"] < linear["escalation_rate"]


def test_the_hindsight_band_meets_the_target_on_the_rows_it_was_chosen_on() -> None:
    view_a, view_b, y = _two_halves(seed=2)
    result = evaluate_stack([View("a", view_a), View("b", view_b)], y)
    assert result["hindsight_escalation_rate"] < 1.0
    assert result["hindsight_auto_accuracy"] >= 0.97
    decided = 1.0 - result["hindsight_escalation_rate"]
    assert result["hindsight_block_rate"] + result["hindsight_allow_rate"] == pytest.approx(decided)


def test_the_lexical_view_reads_the_words_and_takes_only_a_logistic_head() -> None:
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]
    rng = np.random.default_rng(3)
    texts, y = [], []
    for _ in range(300):
        bad = rng.random() < 0.3
        chosen = list(rng.choice(words, size=4)) + (["venomous"] if bad else [])
        texts.append(" ".join(chosen))
        y.append(int(bad))
    counts = LexicalFeatures().counts(texts)
    result = evaluate_stack([View(LEXICAL, counts)], np.asarray(y))
    assert result["roc_auc"] > 0.99
    with pytest.raises(ValueError, match="logistic head"):
        evaluate_stack([View(LEXICAL, counts, "rbf")], np.asarray(y))


def test_a_stack_runs_its_embedders_one_after_another() -> None:
    rates = {"a": 100.0, "b": 100.0, "c": 50.0}
    assert stack_rate(["a", "b"], rates) == pytest.approx(50.0)
    assert stack_rate(["a", "a", LEXICAL], rates) == pytest.approx(100.0)  # one embedder feeds both of its heads
    assert stack_rate(["a", "b", "c"], rates) == pytest.approx(25.0)


def test_a_learning_curve_scores_every_fraction_on_the_same_whole_held_out_rows() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, 40))
    y = (x[:, 0] + 0.5 * x[:, 1] + 0.8 * rng.normal(size=500) > 0.5).astype(np.int64)
    points = learning_curve([View("x", x)], y, fractions=(0.25, 1.0), repeats=2)
    assert [p["repeats"] for p in points] == [2, 1]
    assert points[0]["train_rows"] == 100 and points[1]["train_rows"] == 400  # a quarter of each 400-row part
    assert points[1]["roc_auc"] > points[0]["roc_auc"]  # 40 noisy dimensions: 100 rows overfit, 400 do less
    whole = evaluate_stack([View("x", x)], y)
    assert points[1]["roc_auc"] == pytest.approx(whole["roc_auc"])


def test_the_optional_larger_encoder_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from triage_models.candidates import MPNET_DIR_ENV, make_candidate

    monkeypatch.delenv(MPNET_DIR_ENV, raising=False)
    with pytest.raises(ValueError, match=MPNET_DIR_ENV):
        make_candidate("all-mpnet-base-v2")
