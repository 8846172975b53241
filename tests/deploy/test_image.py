"""The Dockerfile and .dockerignore: what goes into the modpipe image, in which order, and as which user.

No Docker engine is used: the Dockerfile is read as instructions (the ``dockerfile_instructions`` fixture).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
DOCKERIGNORE = ROOT / ".dockerignore"


def _dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile_installs_cpu_torch_before_the_package(dockerfile_instructions: list[tuple[str, str]]) -> None:
    runs = [rest for op, rest in dockerfile_instructions if op == "RUN"]
    torch_idx = next(i for i, r in enumerate(runs) if "torch==" in r and "--index-url" in r)
    install_idx = next(i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r))
    assert torch_idx < install_idx
    args = dict(rest.split("=", 1) for op, rest in dockerfile_instructions if op == "ARG" and "=" in rest)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # The pin matches the project's torch pin.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject


def test_dockerfile_runtime_stage(
    dockerfile_instructions: list[tuple[str, str]], settings_env_names: set[str]
) -> None:
    instr = dockerfile_instructions
    froms = [rest for op, rest in instr if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    last_from = max(i for i, (op, _) in enumerate(instr) if op == "FROM")
    runtime = instr[last_from:]
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the runtime stage must not run as root"
    assert ("ENTRYPOINT", '["modpipe"]') in runtime
    exposed = " ".join(rest for op, rest in runtime if op == "EXPOSE").split()
    assert {"9100", "8080"} <= set(exposed)
    env = " ".join(rest for op, rest in runtime if op == "ENV")
    for name in ("MODPIPE_TRIAGE__MODEL_DIR", "MODPIPE_REASONER__POLICIES_DIR", "MODPIPE_STATE_DIR"):
        assert name in env and name in settings_env_names


def test_dockerfile_copies_only_project_inputs_that_dockerignore_keeps(
    dockerfile_instructions: list[tuple[str, str]], image_inputs: set[str]
) -> None:
    patterns = _dockerignore_patterns()
    for op, rest in dockerfile_instructions:
        if op not in ("COPY", "ADD") or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for source in parts[:-1]:
            top = source.strip("./").split("/")[0]
            assert top in image_inputs, f"Dockerfile copies {source}, outside the project layout"
            assert not any(source.rstrip("/") == p.rstrip("/") or top == p.rstrip("/") for p in patterns), (
                f".dockerignore excludes {source}, which the Dockerfile copies"
            )


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    patterns = set(_dockerignore_patterns())
    for must in (".git", ".venv", ".modpipe", ".env", "tests"):
        assert must in patterns
