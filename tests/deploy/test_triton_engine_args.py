"""The GPU models' vLLM engine arguments (``triton_repo/gpu/gpt-oss-safeguard-*/1/model.json``) load on the vLLM
versions that can serve gpt-oss.

Triton's vLLM backend builds ``AsyncEngineArgs(**model.json)`` (vllm_backend ``src/model.py``), so a key the
dataclass does not declare is a ``TypeError`` and the model never loads. gpt-oss needs vLLM 0.10.1 or later, where
``disable_log_requests`` is no longer a field: it became a deprecated property when ``enable_log_requests``
replaced it (vllm-project/vllm#21739; the failure is vllm-project/vllm#23283, and vllm_backend#96 dropped it
from its own configs). Request logging is off by default there, which is what keeps content out of the logs.

Which vLLM each Triton release's ``vllm-python-py3`` image ships is ``DEFAULT_TRITON_VERSION_MAP["vllm_version"]``
in triton-inference-server/server ``build.py`` on its release branch: r25.08 0.9.2 (cannot load gpt-oss), r25.10
0.10.2, r26.03 0.16.0, r26.04 0.19.0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ReasonerSettings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
GPU_REPO = ROOT / "triton_repo" / "gpu"
FIRST_GPT_OSS_RELEASE = (25, 10)  # the first Triton release whose vLLM (0.10.2) serves gpt-oss
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


def _release(image: str) -> tuple[int, int]:
    found = re.search(r":(\d{2})\.(\d{2})-vllm-python-py3$", image)
    assert found, f"{image}: not a tritonserver:<yy.mm>-vllm-python-py3 tag"
    return int(found.group(1)), int(found.group(2))


def test_compose_and_helm_run_a_triton_whose_vllm_serves_gpt_oss(services: dict[str, dict[str, Any]]) -> None:
    compose_image = re.sub(r"^\$\{TRITON_IMAGE:-(.*)\}$", r"\1", services["triton"]["image"])
    helm_image = yaml.safe_load((ROOT / "helm" / "modpipe" / "values.yaml").read_text())["triton"]["image"]["tag"]
    for image in (compose_image, f"tritonserver:{helm_image}"):
        assert _release(image) >= FIRST_GPT_OSS_RELEASE, f"{image}: its vLLM cannot load gpt-oss-safeguard"
