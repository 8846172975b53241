"""Which language a text is in, so triage does not auto-decide what it was never shown to read.

Why: the triage embedder (all-MiniLM-L6-v2) and its heads were trained and validated on English. On German,
Danish, Chinese or Arabic posts its scores are close to noise (measured in docs/TRIAGE.md), yet a low score would
auto-allow them. The artefact lists the languages it was validated on; a text confidently detected as another
language is escalated to the reasoner (gpt-oss-safeguard reads many languages) instead of auto-decided.

Detection is ``py3langid`` (a modernised langid.py: naive Bayes over byte n-grams, 97 languages, model bundled in
the wheel, BSD-3), about 1 ms per text. Short or mixed texts ("lol", "ok 👍", a URL) are unreliable, so a text
counts as detected only when it has at least :data:`MIN_LETTERS` letters and the normalised probability reaches
the artefact's ``language_min_confidence``; anything else is ``None`` (treated as validated: escalating every
"ok" would cost more than it protects).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

MIN_LETTERS = 12


@dataclass(frozen=True)
class Detected:
    language: str | None  # ISO 639-1 code, None when unsure
    confidence: float


class LanguageDetector:
    """Thread-safe wrapper around one py3langid identifier (its model loads once, ~0.3 s)."""

    def __init__(self, min_confidence: float = 0.9) -> None:
        self.min_confidence = min_confidence
        self._identifier: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._identifier is None:
                from py3langid.langid import MODEL_FILE, LanguageIdentifier

                self._identifier = LanguageIdentifier.from_pickled_model(MODEL_FILE, norm_probs=True)
            return self._identifier

    def detect(self, text: str) -> Detected:
        if sum(ch.isalpha() for ch in text[:2000]) < MIN_LETTERS:
            return Detected(None, 0.0)
        language, probability = self._load().classify(text[:2000])
        probability = float(probability)
        return Detected(str(language) if probability >= self.min_confidence else None, probability)

    def detect_many(self, texts: list[str]) -> list[Detected]:
        return [self.detect(t) for t in texts]
