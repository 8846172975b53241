"""The triage model: calibrated heads over an embedding, read from a versioned artefact folder.

*Heads* are one calibrated logistic regression per category plus an ``any`` head, stored as plain numbers in
``heads.json`` (no pickle: loading an artefact never runs code), scored with one matrix product. The embedder is
chosen by ``settings.triage.embedder`` (:mod:`pipeline.triage.embedders`).

Format 2 adds, all optional: a lexical view for the ``any`` head (hashed character n-grams,
:mod:`pipeline.triage.lexical`; its logit is stacked onto the embedding head's with calibrated weights), the base
rate each head was calibrated at (``train_priors``, what :mod:`pipeline.triage.prior` corrects from), per-category
bands and the validated languages (in ``thresholds.json``, read by the router). Format 1 artefacts still load.

What :meth:`TriageModel.score` returns are :class:`ScoredText` objects: exactly :class:`TriageScores` on the wire
(``violation`` and ``categories`` are prior-corrected when a prior adapter is attached), plus the detected
language for the router, which never leaves the process.

The artefact folder (written by ``triage_models.train``) holds ``heads.json``, ``thresholds.json`` (loads into
:class:`pipeline.router.TriageThresholds`) and ``model_card.json``. Its version is a short content hash of the
heads and thresholds files, checked on load, and stamped on every :class:`TriageScores`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from pydantic import PrivateAttr

from pipeline import metrics
from pipeline.errors import TriageArtefactError
from pipeline.router import TriageThresholds
from pipeline.schemas import TriageScores
from pipeline.triage.embedders import EmbedderProtocol, embedder_from_settings, make_embedder
from pipeline.triage.language import LanguageDetector
from pipeline.triage.lexical import LexicalFeatures
from pipeline.triage.prior import PriorAdapter

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.json"
THRESHOLDS_FILE = "thresholds.json"
MODEL_CARD_FILE = "model_card.json"
HEADS_FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)
ANY_HEAD = "any"
VERSION_CHARS = 12


@dataclass(frozen=True)
class LinearHead:
    """A Platt-calibrated logistic regression: ``p = sigmoid(platt_a * (x . coef + intercept) + platt_b)``."""

    coef: np.ndarray  # (dim,)
    intercept: float
    platt_a: float
    platt_b: float

    def to_json(self) -> dict[str, Any]:
        return {
            "coef": [float(v) for v in self.coef],
            "intercept": float(self.intercept),
            "platt_a": float(self.platt_a),
            "platt_b": float(self.platt_b),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LinearHead:
        return cls(
            coef=np.asarray(data["coef"], dtype=np.float64),
            intercept=float(data["intercept"]),
            platt_a=float(data["platt_a"]),
            platt_b=float(data["platt_b"]),
        )

    def predict_proba(self, emb: np.ndarray) -> np.ndarray:
        return _sigmoid(self.platt_a * (np.asarray(emb, dtype=np.float64) @ self.coef + self.intercept) + self.platt_b)


@dataclass(frozen=True)
class LexicalHead:
    """A logistic head on :class:`LexicalFeatures`, stacked onto the ``any`` embedding head's logit.

    ``p_any = sigmoid(platt_a * (x . w + b) + platt_b + weight * (h . coef + intercept))``: the stacker's weights
    (``platt_a``, ``weight``, ``platt_b``) are fitted on inner out-of-fold decision values of both views.
    """

    features: LexicalFeatures
    coef: np.ndarray  # (n_features,)
    intercept: float
    weight: float

    def decision(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.features.transform(texts) @ self.coef + self.intercept, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        return {**self.features.to_json(), "coef": [round(float(v), 6) for v in self.coef],
                "intercept": float(self.intercept), "weight": float(self.weight)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LexicalHead:
        features = LexicalFeatures.from_json(data)
        coef = np.asarray(data["coef"], dtype=np.float64)
        if coef.shape != (features.n_features,) or not np.all(np.isfinite(coef)):
            raise ValueError("lexical head has a malformed coef vector")
        return cls(features=features, coef=coef, intercept=float(data["intercept"]), weight=float(data["weight"]))


class ScoredText(TriageScores):
    """:class:`TriageScores` plus what the router reads that is not wire evidence (private: never serialised)."""

    _language: str | None = PrivateAttr(default=None)
    _language_confidence: float = PrivateAttr(default=0.0)

    @property
    def language(self) -> str | None:
        """The detected language (None: not detected, or too short or mixed to tell)."""
        return self._language


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # numerically stable, no overflow warnings


def _json_bytes(data: Any) -> bytes:
    """Canonical JSON: the same content always gives the same bytes (and so the same version)."""
    return (json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n").encode("utf-8")


def content_version(heads_bytes: bytes, thresholds_bytes: bytes) -> str:
    """Short content hash of an artefact: what :attr:`TriageScores.model_version` carries."""
    digest = hashlib.sha256()
    for part in (heads_bytes, thresholds_bytes):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()[:VERSION_CHARS]


def write_artefact(
    model_dir: Path,
    *,
    heads: dict[str, LinearHead],
    thresholds: TriageThresholds,
    embedder_name: str,
    embedding_dim: int,
    head_bands: dict[str, tuple[float, float]] | None = None,
    lexical: LexicalHead | None = None,
    train_priors: dict[str, float] | None = None,
) -> str:
    """Write ``heads.json`` and ``thresholds.json``; return the artefact version. The model card is the caller's.

    ``lexical``: the ``any`` head's lexical view (format 2); ``train_priors``: each head's calibration base rate.

    ``head_bands`` (optional, stored in ``heads.json`` under ``bands`` so ``thresholds.json`` stays exactly a
    :class:`TriageThresholds`): each head's own (allow_below, block_above) band, for per-category reporting and
    routing; the router's decision uses the ``any`` head's band in ``thresholds``.
    """
    if ANY_HEAD not in heads:
        raise ValueError(f"heads must include {ANY_HEAD!r}")
    for name, head in heads.items():
        if head.coef.shape != (embedding_dim,):
            raise ValueError(f"head {name} has coef shape {head.coef.shape}, expected ({embedding_dim},)")
    heads_bytes = _json_bytes(
        {
            "format_version": HEADS_FORMAT_VERSION if (lexical is not None or train_priors) else 1,
            "embedder": embedder_name,
            "embedding_dim": embedding_dim,
            "categories": [name for name in heads if name != ANY_HEAD],
            "heads": {name: head.to_json() for name, head in heads.items()},
            **({"bands": {k: [float(v[0]), float(v[1])] for k, v in head_bands.items()}} if head_bands else {}),
            **({"lexical": lexical.to_json()} if lexical is not None else {}),
            **({"train_priors": {k: float(v) for k, v in train_priors.items()}} if train_priors else {}),
        }
    )
    thresholds_bytes = _json_bytes(
        {
            "allow_below": thresholds.allow_below,
            "block_above": thresholds.block_above,
            "high_risk": thresholds.high_risk,
            "category_policies": thresholds.category_policies,
            "policy_floor": thresholds.policy_floor,
            **({"category_bands": {k: [float(v[0]), float(v[1])] for k, v in thresholds.category_bands.items()}}
               if thresholds.category_bands else {}),
            **({"languages": list(thresholds.languages)} if thresholds.languages else {}),
        }
    )
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / HEADS_FILE).write_bytes(heads_bytes)
    (model_dir / THRESHOLDS_FILE).write_bytes(thresholds_bytes)
    return content_version(heads_bytes, thresholds_bytes)


class TriageModel:
    """Scores items with the heads of one artefact. Build it with :meth:`load`."""

    def __init__(
        self,
        *,
        version: str,
        thresholds: TriageThresholds,
        heads: dict[str, LinearHead],
        embedder_name: str,
        embedding_dim: int,
        model_dir: Path | None = None,
        embedder: EmbedderProtocol | None = None,
        model_card: dict[str, Any] | None = None,
        head_bands: dict[str, tuple[float, float]] | None = None,
        embedder_factory: Callable[[], EmbedderProtocol] | None = None,
        lexical: LexicalHead | None = None,
        train_priors: dict[str, float] | None = None,
        prior: PriorAdapter | None = None,
        language_detector: LanguageDetector | None = None,
    ) -> None:
        if ANY_HEAD not in heads:
            raise TriageArtefactError(f"triage artefact {model_dir} has no {ANY_HEAD!r} head")
        self.version = version
        self.base_thresholds = thresholds
        self.categories: list[str] = [name for name in heads if name != ANY_HEAD]
        self.embedder_name = embedder_name
        self.embedding_dim = embedding_dim
        self.model_dir = model_dir
        self.model_card: dict[str, Any] = model_card or {}
        self.head_bands: dict[str, tuple[float, float]] = dict(head_bands or {})
        self._embedder_factory = embedder_factory or make_embedder
        order = [ANY_HEAD, *self.categories]
        # All heads as one affine map: probabilities = sigmoid(emb @ W * a + (b * a + c)).
        self._weights = np.stack([heads[n].coef * heads[n].platt_a for n in order], axis=1)
        self._offsets = np.asarray([heads[n].intercept * heads[n].platt_a + heads[n].platt_b for n in order])
        self.heads_order = order
        self.lexical = lexical
        self.train_priors: dict[str, float] = dict(train_priors or {})
        self.prior = prior
        self.language_detector = language_detector or (LanguageDetector() if thresholds.languages else None)
        self._embedder: EmbedderProtocol | None = None
        self._embedder_lock = threading.Lock()
        if embedder is not None:
            self._attach(embedder)

    @property
    def thresholds(self) -> TriageThresholds:
        """The artefact's thresholds, with the allow level lowered to the prior adapter's miss cap when it has one
        (what the router must use: scores are corrected to the live prior, so is the band)."""
        cap = self.prior.allow_cap if self.prior is not None else None
        if cap is None or cap >= self.base_thresholds.allow_below:
            return self.base_thresholds
        return replace(self.base_thresholds, allow_below=cap)

    @thresholds.setter
    def thresholds(self, value: TriageThresholds) -> None:
        self.base_thresholds = value

    def attach_prior(self, *, mode: str, fixed_prior: float | None = None, min_prior: float = 0.02,
                     max_prior: float = 0.5, window: int = 2000, min_items: int = 500,
                     update_every: int = 100, miss_budget: float | None = 0.2) -> PriorAdapter | None:
        """Correct scores for the live base rate (:mod:`pipeline.triage.prior`); ``mode`` off detaches it.

        Needs the artefact's ``train_priors`` (format 2); an artefact without them cannot be corrected.
        """
        if mode == "off":
            self.prior = None
            return None
        if not self.train_priors or any(h not in self.train_priors for h in self.heads_order):
            raise TriageArtefactError(f"triage artefact {self.model_dir} records no training priors: retrain it "
                                      "to use prior correction (or set the prior mode to off)")
        self.prior = PriorAdapter(heads=list(self.heads_order),
                                  train_priors=np.asarray([self.train_priors[h] for h in self.heads_order]),
                                  mode=mode, fixed_prior=fixed_prior, min_prior=min_prior, max_prior=max_prior,
                                  window=window, min_items=min_items, update_every=update_every,
                                  miss_budget=miss_budget if miss_budget is not None and miss_budget < 1 else None)
        for head, value in self.prior.snapshot().items():
            metrics.triage_prior.labels(head).set(value)
        return self.prior

    @classmethod
    def load(cls, model_dir: Path, embedder: EmbedderProtocol | None = None, *,
             settings: Any | None = None, triton_grpc_url: str | None = None) -> TriageModel:
        """Read and verify an artefact folder. The embedder, if not given, is loaded on first use of :meth:`score`.

        Which embedder: ``settings`` (a :class:`pipeline.config.TriageSettings`) if given, else the default one
        (the project's int8 ONNX embedder).
        """
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TriageArtefactError(
                f"triage artefact folder {model_dir} does not exist (train one with "
                f"`python -m triage_models.train --out {model_dir}`)"
            )
        heads_bytes = _read(model_dir / HEADS_FILE)
        thresholds_bytes = _read(model_dir / THRESHOLDS_FILE)
        card_path = model_dir / MODEL_CARD_FILE
        card: dict[str, Any] = _parse(card_path, _read(card_path)) if card_path.is_file() else {}
        version = content_version(heads_bytes, thresholds_bytes)
        if card.get("version") not in (None, version):
            raise TriageArtefactError(
                f"triage artefact {model_dir} is inconsistent: model card says version {card.get('version')} "
                f"but heads + thresholds hash to {version} (files edited or partly copied?)"
            )
        raw_heads = _parse(model_dir / HEADS_FILE, heads_bytes)
        raw_thresholds = _parse(model_dir / THRESHOLDS_FILE, thresholds_bytes)
        try:
            if raw_heads.get("format_version") not in READABLE_FORMATS:
                raise ValueError(f"unsupported heads format_version {raw_heads.get('format_version')!r}")
            dim = int(raw_heads["embedding_dim"])
            order = [ANY_HEAD, *raw_heads["categories"]]
            if sorted(order) != sorted(raw_heads["heads"]):
                raise ValueError(f"categories {order} do not match the stored heads {sorted(raw_heads['heads'])}")
            heads = {name: LinearHead.from_json(raw_heads["heads"][name]) for name in order}
            for name, head in heads.items():
                if head.coef.shape != (dim,) or not np.all(np.isfinite(head.coef)):
                    raise ValueError(f"head {name!r} has a malformed coef vector")
            thresholds = TriageThresholds(
                allow_below=float(raw_thresholds["allow_below"]),
                block_above=float(raw_thresholds["block_above"]),
                high_risk={str(k): float(v) for k, v in raw_thresholds["high_risk"].items()},
                category_policies={str(k): str(v) for k, v in raw_thresholds["category_policies"].items()},
                policy_floor=float(raw_thresholds["policy_floor"]),
                category_bands={str(k): (float(v[0]), float(v[1]))
                                for k, v in raw_thresholds.get("category_bands", {}).items()},
                languages=tuple(str(v) for v in raw_thresholds.get("languages", [])),
            )
            embedder_name = str(raw_heads["embedder"])
            head_bands = {str(k): (float(v[0]), float(v[1])) for k, v in raw_heads.get("bands", {}).items()}
            lexical = LexicalHead.from_json(raw_heads["lexical"]) if "lexical" in raw_heads else None
            train_priors = {str(k): float(v) for k, v in raw_heads.get("train_priors", {}).items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise TriageArtefactError(f"triage artefact {model_dir} is malformed: {exc}") from exc
        model = cls(
            version=version,
            thresholds=thresholds,
            heads=heads,
            embedder_name=embedder_name,
            embedding_dim=dim,
            model_dir=model_dir,
            embedder=embedder,
            model_card=card,
            head_bands=head_bands,
            embedder_factory=(lambda: embedder_from_settings(settings, triton_grpc_url)) if settings else None,
            lexical=lexical,
            train_priors=train_priors,
        )
        if settings is not None and getattr(settings, "prior_mode", "off") == "adaptive" and not train_priors:
            logger.warning("triage artefact %s records no training priors: scores keep the training base rate "
                           "(retrain it for prior correction)", model_dir)
        elif settings is not None and getattr(settings, "prior_mode", "off") != "off":
            model.attach_prior(mode=settings.prior_mode, fixed_prior=settings.prior_fixed,
                               min_prior=settings.prior_min, max_prior=settings.prior_max,
                               window=settings.prior_window, min_items=settings.prior_min_items,
                               update_every=settings.prior_update_every, miss_budget=settings.prior_miss_budget)
        if settings is not None and not getattr(settings, "language_gate", True):
            model.thresholds = replace(model.thresholds, languages=())
            model.language_detector = None
        logger.info("triage model %s loaded from %s (%d categories)", version, model_dir, len(model.categories))
        return model

    def _attach(self, embedder: EmbedderProtocol) -> None:
        if embedder.dim != self.embedding_dim:
            raise TriageArtefactError(
                f"embedder {embedder.name} gives {embedder.dim}-d vectors but the triage artefact "
                f"{self.model_dir} expects {self.embedding_dim}-d"
            )
        if embedder.name != self.embedder_name:
            logger.warning(
                "triage artefact %s was trained on %s embeddings, scoring with %s",
                self.model_dir,
                self.embedder_name,
                embedder.name,
            )
        self._embedder = embedder

    @property
    def embedder(self) -> EmbedderProtocol:
        """The embedder, loading the default one on first access (a few seconds)."""
        with self._embedder_lock:
            if self._embedder is None:
                self._attach(self._embedder_factory())
            assert self._embedder is not None
            return self._embedder

    def warm_up(self) -> None:
        """Load the embedder and run one item through it, so the first real batch is not slow."""
        self.score(["warm-up"])

    def raw_probabilities(self, emb: np.ndarray, texts: list[str] | None = None) -> np.ndarray:
        """Training-calibrated probabilities, items x heads (``heads_order``: ``any`` first), before any prior
        correction. ``texts`` are needed when the artefact has a lexical view."""
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings of shape (n, {self.embedding_dim}), got {emb.shape}")
        logits = emb @ self._weights + self._offsets
        if self.lexical is not None:
            if texts is None or len(texts) != len(emb):
                raise ValueError("this artefact has a lexical view: pass the texts with their embeddings")
            logits[:, 0] += self.lexical.weight * self.lexical.decision(list(texts))
        return _sigmoid(logits)

    def corrected(self, raw: np.ndarray, *, observe: bool = True) -> np.ndarray:
        """``raw`` under the live priors (unchanged without a prior adapter). An item's score never depends on its
        batch-mates: the batch is corrected with the priors in force before it, then observed."""
        if self.prior is None:
            return raw
        out = self.prior.correct(raw)
        if observe:
            updates = self.prior.updates
            self.prior.observe(raw)
            if self.prior.updates != updates:
                for head, value in self.prior.snapshot().items():
                    metrics.triage_prior.labels(head).set(value)
                metrics.triage_allow_level.set(self.thresholds.allow_below)
        return out

    def score_embeddings(self, emb: np.ndarray, texts: list[str] | None = None,
                         ) -> list[tuple[float, dict[str, float]]]:
        """(violation probability, per-category probabilities) for each row of ``emb`` (normalised vectors),
        training-calibrated (no prior correction)."""
        probs = self.raw_probabilities(emb, texts)
        return [
            (float(row[0]), {c: float(p) for c, p in zip(self.categories, row[1:], strict=True)}) for row in probs
        ]

    def score(self, texts: list[str]) -> list[TriageScores]:
        """Embed and score a batch. ``latency_ms`` is the whole batch's time (what each item waited)."""
        if not texts:
            return []
        embedder = self.embedder  # loading it on first use is not part of any item's latency
        started = time.perf_counter()
        texts = list(texts)
        probs = self.corrected(self.raw_probabilities(embedder.encode(texts), texts))
        detected = self.language_detector.detect_many(texts) if self.language_detector is not None else None
        latency_ms = (time.perf_counter() - started) * 1000.0
        out: list[TriageScores] = []
        for i, row in enumerate(probs):
            scored = ScoredText(model_version=self.version, violation=float(row[0]),
                                categories={c: float(p) for c, p in zip(self.categories, row[1:], strict=True)},
                                latency_ms=latency_ms)
            if detected is not None:
                scored._language = detected[i].language
                scored._language_confidence = detected[i].confidence
                if scored._language is not None and scored._language not in self.thresholds.languages:
                    metrics.triage_unvalidated_language_total.labels(scored._language).inc()
            out.append(scored)
        return out


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise TriageArtefactError(f"triage artefact file {path} is missing") from exc
    except OSError as exc:
        raise TriageArtefactError(f"triage artefact file {path} cannot be read: {exc}") from exc


def _parse(path: Path, data: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TriageArtefactError(f"triage artefact file {path} is not valid JSON: {exc}") from exc
    if not isinstance(parsed, dict):
        raise TriageArtefactError(f"triage artefact file {path} does not hold a JSON object")
    return parsed
