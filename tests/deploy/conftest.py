"""Fixtures shared by the deployment-file tests: the parsed compose file and Dockerfile, the loaded chart, its renders.

Rendering a chart with Helm's Go SDK and parsing the files are the slow, repeated parts of these tests, and every
input is a file in the repository that no test changes: each is loaded once per session. Renders are handed out
as copies, since several tests edit a rendered object to show that a schema refuses the edit.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from pipeline import deploy_check
from pipeline.config import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "modpipe"

Render = Callable[[dict[str, Any]], list[dict[str, Any]]]


@pytest.fixture(scope="session")
def settings_env_names() -> set[str]:
    """Every MODPIPE_<SECTION>__<FIELD> name that Settings reads (plus MODPIPE_STATE_DIR).

    The compose file, the image and the chart all set settings by environment name; a misspelt one is silently
    ignored by pydantic-settings, so each is checked against this set.
    """
    names = {"MODPIPE_STATE_DIR"}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        sub_fields = getattr(model, "model_fields", None)
        if sub_fields:
            names.update(f"MODPIPE_{section.upper()}__{sub.upper()}" for sub in sub_fields)
        else:
            names.add(f"MODPIPE_{section.upper()}")
    return names


@pytest.fixture(scope="session")
def image_inputs() -> set[str]:
    """The project's top-level inputs, all the image is built from.

    With deploy/ they are also the only parts of the checkout a compose service may bind-mount, so neither the
    image nor the stack ever depends on local state, tests or a developer's files.
    """
    return {"pyproject.toml", "README.md", "pipeline", "triage_models", "policies", "triton_repo"}


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    """docker-compose.yml as written (PyYAML, no interpolation): the tests check what the operator reads."""
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="session")
def dockerfile_instructions() -> list[tuple[str, str]]:
    """The Dockerfile as ``(INSTRUCTION, rest)`` pairs, continuation lines joined and comments dropped."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            result.append((op.upper(), rest.strip()))
    return result


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    """The chart loaded by Helm's SDK, for the tests that call the SDK itself (schema checks, refused renders)."""
    with helm.Chart.load(str(CHART_DIR)) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    return deploy_check.load_crd_schemas(ROOT / "deploy" / "crd-schemas")


@pytest.fixture(scope="session")
def render() -> Render:
    """``helm template`` of the chart as release ``demo`` in ``moderation``, rendered once per value set.

    Goes through :func:`pipeline.deploy_check.render_chart`, the render ``modpipe deploy check`` validates.
    """
    rendered: dict[str, list[dict[str, Any]]] = {}

    def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
        key = json.dumps(values, sort_keys=True)
        if key not in rendered:
            rendered[key] = deploy_check.render_chart(CHART_DIR, values, name="demo")
        return copy.deepcopy(rendered[key])

    return _render
