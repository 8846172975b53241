"""Triage: the cheap classifier that decides most items in milliseconds.

Two separable parts, so either can be swapped without touching the other: an embedder
(:mod:`~pipeline.triage.embedders`) and calibrated heads read from a versioned artefact
(:mod:`~pipeline.triage.model`), whose ``any`` head may stack a lexical view (:mod:`~pipeline.triage.lexical`).
Around them: the live prior-shift correction (:mod:`~pipeline.triage.prior`) and the language rule's detector
(:mod:`~pipeline.triage.language`). :mod:`~pipeline.triage.eval` measures an artefact or a cross-validated training
run on a labelled set.
"""

from pipeline.errors import TriageArtefactError
from pipeline.triage.embedders import (
    DEFAULT_EMBEDDER_NAME,
    EMBEDDER_BACKENDS,
    CachedEmbedder,
    Embedder,
    EmbedderProtocol,
    OnnxEmbedder,
    TritonEmbedder,
    embedder_from_settings,
    length_buckets,
    make_embedder,
)
from pipeline.triage.language import LanguageDetector
from pipeline.triage.lexical import LexicalFeatures
from pipeline.triage.model import (
    ANY_HEAD,
    HEADS_FILE,
    MODEL_CARD_FILE,
    THRESHOLDS_FILE,
    LexicalHead,
    LinearHead,
    ScoredText,
    TriageModel,
    content_version,
    write_artefact,
)
from pipeline.triage.prior import PriorAdapter

__all__ = [
    "ANY_HEAD",
    "DEFAULT_EMBEDDER_NAME",
    "EMBEDDER_BACKENDS",
    "HEADS_FILE",
    "MODEL_CARD_FILE",
    "THRESHOLDS_FILE",
    "CachedEmbedder",
    "Embedder",
    "EmbedderProtocol",
    "LanguageDetector",
    "LexicalFeatures",
    "LexicalHead",
    "LinearHead",
    "OnnxEmbedder",
    "PriorAdapter",
    "ScoredText",
    "TriageArtefactError",
    "TriageModel",
    "TritonEmbedder",
    "content_version",
    "embedder_from_settings",
    "length_buckets",
    "make_embedder",
    "write_artefact",
]
