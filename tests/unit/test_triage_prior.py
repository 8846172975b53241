"""Prior-shift correction: Bayes' rule for a new base rate, its EM estimate, and the bounded live adapter.

Why: a triage calibrated on a 31 % violating set escalates as if a third of a platform's traffic were bad; the
correction must recover the live rate without labels, stay inside its bounds whatever the traffic does, and give
the same numbers for the same sequence of scores (replays and audits).
"""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.triage.prior import PriorAdapter, em_prior, miss_capped_allow, shift_probabilities

pytestmark = pytest.mark.unit


def _calibrated_scores(prior: float, n: int, seed: int, train_prior: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Posteriors calibrated at ``train_prior`` for data drawn with ``prior``: class-conditional Gaussians on a
    logit scale, so Bayes' rule gives exact posteriors."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(np.int8)
    z = rng.normal(np.where(y == 1, 1.5, -1.5), 1.0)
    likelihood_ratio = np.exp(3.0 * z)  # N(1.5,1) / N(-1.5,1)
    odds = likelihood_ratio * train_prior / (1 - train_prior)
    return odds / (1 + odds), y


def test_shifting_to_the_training_prior_changes_nothing_and_shifts_invert() -> None:
    p = np.linspace(0.01, 0.99, 50)
    assert np.allclose(shift_probabilities(p, 0.3, 0.3), p)
    there = shift_probabilities(p, 0.3, 0.05)
    assert np.all(there < p)
    assert np.allclose(shift_probabilities(there, 0.05, 0.3), p)


def test_em_recovers_the_live_prior_without_labels() -> None:
    p, y = _calibrated_scores(0.04, 20_000, seed=1)
    estimate = em_prior(p, 0.3)
    assert estimate == pytest.approx(y.mean(), abs=0.01)
    corrected = shift_probabilities(p, 0.3, estimate)
    assert corrected.mean() == pytest.approx(y.mean(), abs=0.01)  # calibrated again on the live traffic


def test_adapter_waits_for_enough_items_then_moves_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    p, _ = _calibrated_scores(0.04, 3000, seed=2)
    adapter = PriorAdapter(heads=["any"], train_priors=np.asarray([0.3]), min_items=500, update_every=100,
                           window=2000, min_prior=0.01, max_prior=0.5)
    adapter.observe(p[:499, None])
    assert adapter.priors[0] == pytest.approx(0.3)  # not enough evidence yet
    with caplog.at_level("INFO", logger="pipeline.triage.prior"):
        adapter.observe(p[499:, None])
    assert adapter.priors[0] == pytest.approx(0.04, abs=0.015)
    assert any("re-estimated" in r.getMessage() for r in caplog.records)
    assert all("text" not in r.getMessage() for r in caplog.records)


def test_adapter_is_bounded_against_a_flood_of_benign_posts() -> None:
    adapter = PriorAdapter(heads=["any", "H"], train_priors=np.asarray([0.3, 0.1]), min_items=100,
                           update_every=50, min_prior=0.02, max_prior=0.5)
    adapter.observe(np.full((1000, 2), 1e-4))
    assert adapter.priors[0] == pytest.approx(0.02)
    assert adapter.priors[1] >= 0.1 * 0.02 / 0.3 - 1e-12  # category bounds scale with the `any` bounds
    adapter.observe(np.full((3000, 2), 0.999))
    assert adapter.priors[0] == pytest.approx(0.5)


def test_same_scores_in_the_same_order_give_the_same_priors() -> None:
    p, _ = _calibrated_scores(0.08, 2000, seed=3)
    runs = []
    for _ in range(2):
        adapter = PriorAdapter(heads=["any"], train_priors=np.asarray([0.3]))
        for start in range(0, len(p), 32):
            adapter.observe(p[start:start + 32, None])
        runs.append(adapter.snapshot())
    assert runs[0] == runs[1]


def test_fixed_and_off_modes() -> None:
    fixed = PriorAdapter(heads=["any", "S"], train_priors=np.asarray([0.3, 0.06]), mode="fixed", fixed_prior=0.05)
    assert fixed.priors[0] == pytest.approx(0.05) and fixed.priors[1] == pytest.approx(0.01)
    fixed.observe(np.full((5000, 2), 0.9))
    assert fixed.priors[0] == pytest.approx(0.05)  # a fixed prior never moves
    off = PriorAdapter(heads=["any"], train_priors=np.asarray([0.3]), mode="off")
    raw = np.asarray([[0.2], [0.7]])
    assert np.array_equal(off.correct(raw), raw)
    with pytest.raises(ValueError):
        PriorAdapter(heads=["any"], train_priors=np.asarray([0.3]), mode="fixed")


def test_miss_budget_caps_the_allow_level_so_expected_misses_stay_within_it() -> None:
    p, y = _calibrated_scores(0.04, 20_000, seed=4)
    q = shift_probabilities(p, 0.3, 0.04)
    cap = miss_capped_allow(q, 0.2)
    assert q[q < cap].sum() <= 0.2 * q.sum() + 1e-9
    assert q[q <= cap].sum() > 0.2 * q.sum() - 1e-9  # the highest such level
    allowed_violations = (y[q < cap] == 1).sum() / (y == 1).sum()
    assert allowed_violations == pytest.approx(0.2, abs=0.05)  # calibrated scores: expected misses come true
    adapter = PriorAdapter(heads=["any"], train_priors=np.asarray([0.3]), miss_budget=0.2, min_items=500)
    assert adapter.allow_cap is None
    adapter.observe(p[:3000, None])
    assert adapter.allow_cap is not None and 0 < adapter.allow_cap < 1
