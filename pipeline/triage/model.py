"""The triage model: calibrated heads over an embedding, read from a versioned artefact folder.

*Heads* are one calibrated logistic regression per category plus an ``any`` head, stored as plain numbers in
``heads.json`` (no pickle: loading an artefact never runs code), scored with one matrix product. The embedder is
chosen by ``settings.triage.embedder`` (:mod:`pipeline.triage.embedders`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import TriageArtefactError
from pipeline.router import TriageThresholds
from pipeline.schemas import TriageScores
from pipeline.triage.embedders import EmbedderProtocol, embedder_from_settings, make_embedder

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.json"
THRESHOLDS_FILE = "thresholds.json"
MODEL_CARD_FILE = "model_card.json"
HEADS_FORMAT_VERSION = 1
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
) -> str:
    """Write ``heads.json`` and ``thresholds.json``; return the artefact version. The model card is the caller's.

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
            "format_version": HEADS_FORMAT_VERSION,
            "embedder": embedder_name,
            "embedding_dim": embedding_dim,
            "categories": [name for name in heads if name != ANY_HEAD],
            "heads": {name: head.to_json() for name, head in heads.items()},
            **({"bands": {k: [float(v[0]), float(v[1])] for k, v in head_bands.items()}} if head_bands else {}),
        }
    )
    thresholds_bytes = _json_bytes(
        {
            "allow_below": thresholds.allow_below,
            "block_above": thresholds.block_above,
            "high_risk": thresholds.high_risk,
            "category_policies": thresholds.category_policies,
            "policy_floor": thresholds.policy_floor,
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
    ) -> None:
        if ANY_HEAD not in heads:
            raise TriageArtefactError(f"triage artefact {model_dir} has no {ANY_HEAD!r} head")
        self.version = version
        self.thresholds = thresholds
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
        self._embedder: EmbedderProtocol | None = None
        self._embedder_lock = threading.Lock()
        if embedder is not None:
            self._attach(embedder)

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
            if raw_heads.get("format_version") != HEADS_FORMAT_VERSION:
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
            )
            embedder_name = str(raw_heads["embedder"])
            head_bands = {str(k): (float(v[0]), float(v[1])) for k, v in raw_heads.get("bands", {}).items()}
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
        )
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

    def score_embeddings(self, emb: np.ndarray) -> list[tuple[float, dict[str, float]]]:
        """(violation probability, per-category probabilities) for each row of ``emb`` (normalised vectors)."""
        emb = np.asarray(emb, dtype=np.float64)
        if emb.ndim != 2 or emb.shape[1] != self.embedding_dim:
            raise ValueError(f"expected embeddings of shape (n, {self.embedding_dim}), got {emb.shape}")
        probs = _sigmoid(emb @ self._weights + self._offsets)
        return [
            (float(row[0]), {c: float(p) for c, p in zip(self.categories, row[1:], strict=True)}) for row in probs
        ]

    def score(self, texts: list[str]) -> list[TriageScores]:
        """Embed and score a batch. ``latency_ms`` is the whole batch's time (what each item waited)."""
        if not texts:
            return []
        embedder = self.embedder  # loading it on first use is not part of any item's latency
        started = time.perf_counter()
        results = self.score_embeddings(embedder.encode(list(texts)))
        latency_ms = (time.perf_counter() - started) * 1000.0
        return [
            TriageScores(model_version=self.version, violation=v, categories=cats, latency_ms=latency_ms)
            for v, cats in results
        ]


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
