"""Prior-shift correction: calibrated probabilities that follow the live base rate of violations.

Why: every head is calibrated on its training data's base rate (the OpenAI set is 31 % violating). On a platform
where 3 % of posts violate, the same text is far less likely to be a violation than the training calibration says,
so a model that keeps the training prior escalates as if a third of the traffic were bad. Under a pure prior shift
(the texts of each class look the same, only their proportions change) the correct posterior is Bayes' rule with
the new prior (Saerens, Latinne & Decaestecker 2002)::

    p' = (pi / pi_t) p / ((pi / pi_t) p + ((1 - pi) / (1 - pi_t)) (1 - p))

and the new prior ``pi`` can be estimated without labels by their EM iteration over the model's own posteriors on
recent traffic: ``pi <- mean(p'(pi))`` until it stops moving.

The correction alone is not safe. With 3.7 % violations, corrected scores push nearly everything under the allow
level: escalation falls from 27 % to 3 % and auto-decided accuracy stays above 0.97, yet about half of the
violations are auto-allowed (measured on the realistic mix, docs/TRIAGE.md): at a low base rate, accuracy alone
cannot see misses. So the adapter also keeps a **miss budget**: from the corrected scores of the recent window it
computes the highest allow level under which the *expected* violations (the sum of calibrated probabilities) stay
within ``miss_budget`` of all expected violations, and the router allows only below the lower of that and the
trained level (:attr:`allow_cap`).

:class:`PriorAdapter` does that per head, bounded and deterministic: it keeps the raw (training-calibrated)
probabilities of the last ``window`` items, re-estimates every ``update_every`` items once it has seen
``min_items``, clamps each estimate to ``[min_prior, max_prior]`` (a flood of benign posts can lower the prior,
and so the scores, only so far), and logs each change. The same sequence of scores always gives the same
estimates. A ``fixed`` prior (for example the rate of violations in the final verdicts a platform observed,
``modpipe triage prior``) skips the estimation.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

PRIOR_MODES = ("off", "fixed", "adaptive")
_EPS = 1e-6


def shift_probabilities(p: np.ndarray, train_prior: np.ndarray | float, new_prior: np.ndarray | float) -> np.ndarray:
    """Bayes' rule for a new class prior; ``p`` calibrated at ``train_prior``. Broadcasts over the last axis."""
    p = np.clip(np.asarray(p, dtype=np.float64), _EPS, 1 - _EPS)
    t = np.clip(np.asarray(train_prior, dtype=np.float64), _EPS, 1 - _EPS)
    n = np.clip(np.asarray(new_prior, dtype=np.float64), _EPS, 1 - _EPS)
    pos = (n / t) * p
    neg = ((1 - n) / (1 - t)) * (1 - p)
    return pos / (pos + neg)


def em_prior(p: np.ndarray, train_prior: float, *, iterations: int = 100, tol: float = 1e-6) -> float:
    """Saerens' EM estimate of the prior of the data behind the posteriors ``p`` (1-d, calibrated at train_prior)."""
    p = np.asarray(p, dtype=np.float64)
    if p.size == 0:
        return float(train_prior)
    prior = float(np.mean(p))  # a fair start: the mean posterior is the estimate under the training prior
    for _ in range(iterations):
        new = float(np.mean(shift_probabilities(p, train_prior, prior)))
        if abs(new - prior) < tol:
            return new
        prior = new
    return prior


def miss_capped_allow(q: np.ndarray, budget: float) -> float:
    """The highest allow level ``a`` such that ``sum(q[q < a]) <= budget * sum(q)`` (``q``: calibrated scores)."""
    q = np.sort(np.asarray(q, dtype=np.float64))
    total = float(q.sum())
    if total <= 0 or len(q) == 0:
        return 1.0
    share = np.cumsum(q) / total
    k = int(np.searchsorted(share, budget, side="right"))  # items [0, k) fit in the budget
    return float(q[k]) if k < len(q) else 1.0


@dataclass
class PriorAdapter:
    """Per-head live priors for a :class:`~pipeline.triage.TriageModel`; thread-safe.

    ``heads`` names the columns of the probability matrices it sees (``any`` first, then the categories);
    ``train_priors`` the base rate each head was calibrated at (from the artefact). ``observe`` feeds raw
    probabilities (in arrival order), ``correct`` maps raw probabilities to the current priors.
    """

    heads: list[str]
    train_priors: np.ndarray
    mode: str = "adaptive"
    fixed_prior: float | None = None  # mode "fixed": the `any` prior; categories keep their ratio to it
    min_prior: float = 0.01
    max_prior: float = 0.5
    window: int = 2000
    min_items: int = 500
    update_every: int = 100
    miss_budget: float | None = 0.2  # share of expected violations the allow band may hold; None: no cap
    priors: np.ndarray = field(init=False)
    allow_cap: float | None = field(init=False, default=None)
    seen: int = field(init=False, default=0)
    updates: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.mode not in PRIOR_MODES:
            raise ValueError(f"prior mode must be one of {PRIOR_MODES}, got {self.mode!r}")
        if not 0 < self.min_prior <= self.max_prior < 1:
            raise ValueError(f"need 0 < min_prior <= max_prior < 1, got {self.min_prior}, {self.max_prior}")
        self.train_priors = np.asarray(self.train_priors, dtype=np.float64)
        if self.train_priors.shape != (len(self.heads),):
            raise ValueError(f"train_priors has shape {self.train_priors.shape}, expected ({len(self.heads)},)")
        self.priors = self.train_priors.copy()
        self._recent: deque[np.ndarray] = deque(maxlen=self.window)
        self._since_update = 0
        self._lock = threading.Lock()
        if self.mode == "fixed":
            if self.fixed_prior is None:
                raise ValueError("prior mode 'fixed' needs fixed_prior")
            self.priors = self._bounded(self.train_priors * (self.fixed_prior / self.train_priors[0]))
            self.priors[0] = float(np.clip(self.fixed_prior, self.min_prior, self.max_prior))
            logger.info("triage prior fixed at %.4f (trained at %.4f)", self.priors[0], self.train_priors[0])

    def _bounded(self, priors: np.ndarray) -> np.ndarray:
        # Category heads may sit far below the `any` bounds (0.2 % sexual/minors): bound each head relative to its
        # training prior, scaled the way the `any` bounds scale the `any` prior, never above the `any` maximum.
        low = np.minimum(self.train_priors, self.min_prior * self.train_priors / self.train_priors[0])
        high = np.maximum(np.minimum(self.max_prior, self.max_prior * self.train_priors / self.train_priors[0]), low)
        return np.clip(priors, low, high)

    def observe(self, raw: np.ndarray) -> None:
        """Record raw probabilities (rows = items, columns = heads) and re-estimate when it is time."""
        if self.mode == "off":
            return
        raw = np.atleast_2d(np.asarray(raw, dtype=np.float64))
        with self._lock:
            for row in raw:
                self._recent.append(row)
                self.seen += 1
                self._since_update += 1
                if self.seen >= self.min_items and self._since_update >= self.update_every:
                    self._update()

    def _update(self) -> None:
        matrix = np.stack(self._recent)
        if self.mode == "adaptive":
            estimate = np.asarray([em_prior(matrix[:, j], float(self.train_priors[j]))
                                   for j in range(len(self.heads))])
            estimate[0] = float(np.clip(estimate[0], self.min_prior, self.max_prior))
            estimate[1:] = self._bounded(estimate)[1:]
        else:
            estimate = self.priors.copy()
        self._since_update = 0
        self.updates += 1
        moved = float(np.max(np.abs(estimate - self.priors)))
        self.priors = estimate
        if self.miss_budget is not None:
            self.allow_cap = miss_capped_allow(shift_probabilities(matrix[:, 0], self.train_priors[0], estimate[0]),
                                               self.miss_budget)
        if moved >= 0.005 or self.updates == 1:
            logger.info("triage prior re-estimated over %d items: any %.4f (trained at %.4f, bounds %.3f-%.3f); "
                        "allow cap %s", len(matrix), estimate[0], self.train_priors[0], self.min_prior, self.max_prior,
                        "none" if self.allow_cap is None else f"{self.allow_cap:.4f}")

    def correct(self, raw: np.ndarray) -> np.ndarray:
        """``raw`` (items x heads) under the current priors; unchanged when the mode is off or nothing moved yet."""
        if self.mode == "off":
            return np.asarray(raw, dtype=np.float64)
        with self._lock:
            priors = self.priors.copy()
        return shift_probabilities(raw, self.train_priors, priors)

    def snapshot(self) -> dict[str, float]:
        """The prior each head currently applies (for logs, metrics and reports)."""
        with self._lock:
            return {h: float(p) for h, p in zip(self.heads, self.priors, strict=True)}
