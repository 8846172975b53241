"""A scripted triage scorer for handler tests: each text's scores are given in advance.

It stands in for :class:`pipeline.triage.TriageModel` where the handler, not the classifier, is under test: it has
the model's ``version``, ``thresholds`` and ``score(texts)`` (one :class:`TriageScores` per text, the whole batch's
latency on each, as the real model reports it). A text that is not in the script raises :class:`UnscriptedScore`
(an AssertionError, which the handlers never swallow into a verdict: the batch becomes dead letters and the test
sees it); ``fail_with`` makes every batch raise, as a broken embedder would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.router import TriageThresholds
from pipeline.schemas import TriageScores


# Bands for scripted scores: every default policy has a category, so triage may clear an item by itself; SH is
# high risk from 0.5.
SCRIPTED_THRESHOLDS = TriageThresholds(
    allow_below=0.2, block_above=0.9, high_risk={"SH": 0.5},
    category_policies={"H": "hate", "HR": "harassment", "V": "violence", "S": "sexual", "S3": "sexual_minors",
                       "SH": "self_harm"},
)


class UnscriptedScore(AssertionError):
    """The scorer was asked about a text its script does not have."""


@dataclass
class ScriptedScorer:
    thresholds: TriageThresholds
    script: dict[str, tuple[float, dict[str, float]]] = field(default_factory=dict)  # text -> (violation, categories)
    version: str = "scripted"
    fail_with: BaseException | None = None
    batches: list[list[str]] = field(default_factory=list)

    def score(self, texts: list[str]) -> list[TriageScores]:
        self.batches.append(list(texts))
        if self.fail_with is not None:
            raise self.fail_with
        missing = [t for t in texts if t not in self.script]
        if missing:
            raise UnscriptedScore(f"{len(missing)} unscripted text(s) in a batch of {len(texts)}")
        return [
            TriageScores(model_version=self.version, violation=self.script[t][0], categories=self.script[t][1],
                         latency_ms=1.0)
            for t in texts
        ]
