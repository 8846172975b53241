"""``modpipe deploy check``, the command CI runs: one line per artefact, and every one must say ok."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipeline.cli import app as cli_app

pytestmark = pytest.mark.deploy


def test_modpipe_deploy_check_passes_for_every_artefact() -> None:
    result = CliRunner().invoke(cli_app, ["deploy", "check"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 0, result.output
    assert lines and all(line.startswith("ok   ") for line in lines), result.output
    artefacts = [line.split(":", 1)[0][5:] for line in lines]
    assert "helm/modpipe (defaults)" in artefacts
    assert {"helm/modpipe (examples/values-small.yaml)", "helm/modpipe (examples/values-large.yaml)"} <= set(artefacts)
    assert {f"docker-compose.yml ({p})" for p in ("no profile", "profile gpu", "profile cpu")} <= set(artefacts)
    assert {"deploy/prometheus.yml", "deploy/prometheus-rules.yml", "deploy/grafana/dashboards/modpipe.json"} <= set(artefacts)
    assert "helm v4" in result.output and "Kubernetes 1.30.0" in result.output
