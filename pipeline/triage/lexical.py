"""A second, lexical view of a text for the triage heads: hashed character n-grams with tf-idf weights.

Why: a sentence embedding smooths away the surface cues moderation depends on (slurs, misspelt profanity, leet
speak, emoji runs), and a 256-token embedder never reads the end of a long post. Character n-grams of the whole
text see both. On the OpenAI moderation set a logistic head on these features alone scores about as well as one
on MiniLM embeddings (ROC-AUC 0.885 vs 0.893), and the two views stacked beat either (0.910): they make different
mistakes. Cost: about 1 ms per text, no model file, a fixed-size vector.

Features are ``char_wb`` n-grams (2-5 characters inside word boundaries, lower-cased) hashed into ``n_features``
buckets with scikit-learn's ``HashingVectorizer`` (MurmurHash3, seed 0: the same text gives the same buckets on
every machine and version), then sublinear tf, the artefact's idf weights and L2 normalisation. No vocabulary is
stored, so the artefact holds only ``n_features`` idf weights and one coefficient vector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_N_FEATURES = 2**14
DEFAULT_NGRAMS = (2, 5)


@dataclass(frozen=True)
class LexicalFeatures:
    """The featuriser: ``transform(texts)`` -> sparse CSR matrix (rows L2-normalised)."""

    n_features: int = DEFAULT_N_FEATURES
    ngram_range: tuple[int, int] = DEFAULT_NGRAMS
    idf: np.ndarray | None = None  # (n_features,); None: plain sublinear tf (what fit_idf starts from)

    def _vectorizer(self) -> Any:
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(analyzer="char_wb", ngram_range=self.ngram_range, n_features=self.n_features,
                                 alternate_sign=False, norm=None, lowercase=True, dtype=np.float64)

    def counts(self, texts: list[str]) -> Any:
        """Raw hashed n-gram counts (CSR); what :meth:`fit_idf` and :meth:`weigh` take."""
        return self._vectorizer().transform(texts)

    def weigh(self, counts: Any) -> Any:
        """Sublinear tf x idf, L2-normalised rows, from :meth:`counts`."""
        from sklearn.preprocessing import normalize

        matrix = counts.astype(np.float64, copy=True).tocsr()
        matrix.data = 1.0 + np.log(matrix.data)
        if self.idf is not None:
            matrix = matrix.multiply(self.idf[None, :]).tocsr()
        return normalize(matrix, norm="l2", copy=False)

    def transform(self, texts: list[str]) -> Any:
        return self.weigh(self.counts(texts))

    def fit_idf(self, counts: Any) -> LexicalFeatures:
        """A copy with smooth idf weights (scikit-learn's formula) learnt from ``counts`` of training texts."""
        df = np.bincount(counts.tocsr().indices, minlength=self.n_features).astype(np.float64)
        n = counts.shape[0]
        idf = np.log((1.0 + n) / (1.0 + df)) + 1.0
        return LexicalFeatures(n_features=self.n_features, ngram_range=self.ngram_range, idf=idf)

    def to_json(self) -> dict[str, Any]:
        return {"analyzer": "char_wb", "lowercase": True, "hash": "murmurhash3_32 seed 0 (scikit-learn)",
                "ngram_range": list(self.ngram_range), "n_features": self.n_features, "sublinear_tf": True,
                "norm": "l2", "idf": None if self.idf is None else [round(float(v), 6) for v in self.idf]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LexicalFeatures:
        if data.get("analyzer") != "char_wb" or not data.get("lowercase", False):
            raise ValueError("lexical features must be lower-cased char_wb n-grams")
        n = int(data["n_features"])
        idf = None if data.get("idf") is None else np.asarray(data["idf"], dtype=np.float64)
        if idf is not None and (idf.shape != (n,) or not np.all(np.isfinite(idf))):
            raise ValueError("lexical idf has the wrong shape or non-finite values")
        lo, hi = (int(v) for v in data["ngram_range"])
        return cls(n_features=n, ngram_range=(lo, hi), idf=idf)
