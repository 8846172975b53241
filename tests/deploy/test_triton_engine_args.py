"""The GPU models' vLLM engine arguments (``triton_repo/gpu/gpt-oss-safeguard-*/1/model.json``) load on the vLLM
versions that can serve gpt-oss.

Triton's vLLM backend builds ``AsyncEngineArgs(**model.json)`` (vllm_backend ``src/model.py``), so a key the
dataclass does not declare is a ``TypeError`` and the model never loads. gpt-oss needs vLLM 0.10.1 or later, where
``disable_log_requests`` is no longer a field: it became a deprecated property when ``enable_log_requests``
replaced it (vllm-project/vllm#21739; the failure is vllm-project/vllm#23283, and vllm_backend#96 dropped it
from its own configs). Request logging is off by default there, which is what keeps content out of the logs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.config import ReasonerSettings

pytestmark = pytest.mark.deploy

GPU_REPO = Path(__file__).resolve().parents[2] / "triton_repo" / "gpu"
REASONERS = sorted(GPU_REPO.glob("gpt-oss-safeguard-*/1/model.json"))

# Keys that are not AsyncEngineArgs fields on vLLM >= 0.10.1 (each a TypeError at load), and what replaced them.
NOT_FIELDS = {
    "disable_log_requests": "enable_log_requests (default false: requests are not logged)",
}


def test_there_are_reasoner_models_to_check() -> None:
    assert {p.parent.parent.name for p in REASONERS} == {"gpt-oss-safeguard-20b", "gpt-oss-safeguard-120b"}


@pytest.mark.parametrize("path", REASONERS, ids=lambda p: p.parent.parent.name)
def test_engine_args_are_fields_of_the_vllm_that_serves_gpt_oss(path: Path) -> None:
    args = json.loads(path.read_text(encoding="utf-8"))
    stale = {key: NOT_FIELDS[key] for key in args if key in NOT_FIELDS}
    assert not stale, f"{path}: not an AsyncEngineArgs field on vLLM >= 0.10.1 (the model would not load): {stale}"


@pytest.mark.parametrize("path", REASONERS, ids=lambda p: p.parent.parent.name)
def test_engine_context_is_the_one_the_reasoner_budgets_for(path: Path) -> None:
    args = json.loads(path.read_text(encoding="utf-8"))
    assert args["max_model_len"] == ReasonerSettings().max_model_len
    assert args["enable_prefix_caching"] is True  # every call for a policy shares its system + developer prefix
    assert args["model"].startswith("openai/gpt-oss-safeguard-")
