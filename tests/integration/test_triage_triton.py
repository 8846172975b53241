"""The triage embedder served by Triton (``triton_repo/gpu/minilm_embedder``), loaded here on CPU.

Why: a GPU fleet selects it with ``MODPIPE_TRIAGE__EMBEDDER=triton``; the vectors it returns must be the ones the
heads expect (same model, same pooling), requests merged by the dynamic batcher must come back to the right
caller, and the worker's scoring path must work through it. The production config asks for a GPU; the test copies
the model folder and changes only the instance kind.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from pipeline.config import PROJECT_ROOT, TriageSettings
from pipeline.stack import StackInfo, stack_down, stack_up
from pipeline.triage import Embedder, TriageModel, TritonEmbedder, make_embedder

pytestmark = pytest.mark.integration

MODEL_DIR = PROJECT_ROOT / "triton_repo" / "gpu" / "minilm_embedder"
TEXTS = [
    "What time does the library open on Saturday?",
    "I will kill you and your whole family, you worthless piece of garbage.",
    "short",
    "A much longer message about gardening, " * 30,
]


@pytest.fixture(scope="module")
def embedder_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    repo = tmp_path_factory.mktemp("triton_embedder_repo")
    shutil.copytree(MODEL_DIR, repo / "minilm_embedder")
    config = repo / "minilm_embedder" / "config.pbtxt"
    text = config.read_text()
    assert "kind: KIND_GPU" in text
    config.write_text(text.replace("kind: KIND_GPU", "kind: KIND_CPU"))
    try:
        info = stack_up(tmp_path_factory.mktemp("triage_triton"), private_redis=True, triton_repo=repo, timeout_s=300)
    except Exception as exc:
        pytest.fail(f"stack with the embedder model did not start: {exc}", pytrace=False)
    yield info
    stack_down(info.state_dir)


@pytest.fixture(scope="module")
def reference() -> Embedder:
    return Embedder()


def test_triton_embedder_matches_sentence_transformers(embedder_stack: StackInfo, reference: Embedder) -> None:
    remote = TritonEmbedder(embedder_stack.triton_grpc)
    vectors = remote.encode(TEXTS)
    assert remote.dim == 384 and vectors.shape == (len(TEXTS), 384) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    cosine = np.sum(vectors * reference.encode(TEXTS), axis=1)
    assert cosine.min() > 0.999, cosine


def test_concurrent_requests_are_batched_and_returned_to_their_callers(embedder_stack: StackInfo) -> None:
    remote = TritonEmbedder(embedder_stack.triton_grpc)
    alone = {t: remote.encode([t])[0] for t in TEXTS}
    batches = [[TEXTS[i % len(TEXTS)], TEXTS[(i + 1) % len(TEXTS)]] for i in range(8)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(remote.encode, batches))
    for batch, result in zip(batches, results, strict=True):
        for text, vector in zip(batch, result, strict=True):
            assert float(vector @ alone[text]) > 0.9999


def test_triage_model_scores_through_the_triton_backend(embedder_stack: StackInfo) -> None:
    settings = TriageSettings(embedder="triton", embedding_cache_size=0)
    model = TriageModel.load(settings.model_dir, settings=settings, triton_grpc_url=embedder_stack.triton_grpc)
    scores = model.score(TEXTS[:2])
    assert model.embedder.name.endswith(":triton")
    assert [s.model_version for s in scores] == [model.version] * 2
    assert scores[1].violation > scores[0].violation


def test_unknown_triton_model_is_a_clear_error(embedder_stack: StackInfo) -> None:
    from pipeline.triage import TriageArtefactError

    with pytest.raises(TriageArtefactError, match="does not serve 'no_such_model'"):
        make_embedder("triton", triton_url=embedder_stack.triton_grpc, triton_model="no_such_model")
