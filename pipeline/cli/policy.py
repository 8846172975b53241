"""``modpipe policy lint`` and ``modpipe policy test``: policies treated as software.

lint checks every folder (structure, output-format instructions stated and restated, escalation path, unique rule
ids, 400-600 o200k tokens, examples and golden rows that cite real rules with matching labels) and exits 1 on any
problem; test runs one policy's golden set against a reasoner endpoint and exits 1 when accuracy falls below
``--min-accuracy``. Lint never reads the shared datasets folder; test resolves the golden references from it
(``MODPIPE_DATASETS_DIR``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from pipeline.cli.common import console, fail, settings

policy_app = typer.Typer(help="Policies: lint them, test them against a reasoner.", no_args_is_help=True)


def _library(ctx: typer.Context, strict: bool):  # type: ignore[no-untyped-def]
    from pipeline.errors import PolicyError
    from pipeline.policies import PolicyLibrary

    try:
        return PolicyLibrary.from_settings(settings(ctx).reasoner, strict=strict)
    except PolicyError as exc:
        fail(str(exc))


@policy_app.command("lint")
def policy_lint(ctx: typer.Context) -> None:
    """Check every policy folder; exit 1 if any has problems."""
    from pipeline.policies import count_tokens, lint_policy

    library = _library(ctx, strict=False)
    table = Table("policy", "version", "severity", "tokens", "rules", "golden", "result")
    problems = 0
    for policy in library:
        found = lint_policy(policy)
        problems += len(found)
        table.add_row(
            policy.policy_id, policy.version, policy.severity + (" high-risk" if policy.high_risk else ""),
            str(count_tokens(policy.text)), str(len(policy.rules)), str(len(policy.golden)),
            "[green]ok[/]" if not found else "[red]" + "; ".join(found) + "[/]",
        )
    console.print(table)
    if problems:
        raise typer.Exit(1)


@policy_app.command("test")
def policy_test(
    ctx: typer.Context,
    policy: str = typer.Argument(..., help="Policy id (folder name), e.g. violence."),
    reasoner: str = typer.Option(
        ..., "--reasoner", help="triton://host:port/MODEL or http(s)://host:port/v1 (OpenAI-compatible)."
    ),
    model: Optional[str] = typer.Option(None, "--model", help="Model name for an OpenAI-compatible endpoint."),
    effort: Optional[str] = typer.Option(None, "--effort", help="low, medium or high (default: the policy's first)."),
    concurrency: int = typer.Option(8, "--concurrency", help="Golden rows judged at once."),
    timeout_s: float = typer.Option(120.0, "--timeout-s", help="Timeout per call."),
    min_accuracy: float = typer.Option(0.0, "--min-accuracy", help="Exit 1 below this accuracy."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the full report here."),
) -> None:
    """Run POLICY's golden set against a reasoner: accuracy, F1, confusion matrix, tokens and latency."""
    from pipeline.errors import PolicyError
    from pipeline.policies.golden import backend_for, parse_endpoint, run_golden
    from pipeline.schemas import Effort

    library = _library(ctx, strict=True)
    configured = settings(ctx).reasoner
    try:
        endpoint = parse_endpoint(reasoner, model or configured.openai_model)
        chosen = Effort(effort) if effort else None
    except ValueError as exc:
        fail(str(exc), code=2)
    api_key = configured.openai_api_key.get_secret_value() if configured.openai_api_key else None
    backend = backend_for(endpoint, timeout_s, api_key)
    try:
        report = asyncio.run(run_golden(library, policy, backend, datasets_dir=settings(ctx).datasets_dir,
                                        effort=chosen, concurrency=concurrency, timeout_s=timeout_s))
    except PolicyError as exc:  # unknown policy, no golden set, a golden reference that does not resolve
        fail(str(exc))
    c = report["confusion"]
    console.print(
        f"[bold]{policy}[/] {report['version']} on {report['model']} at effort {report['effort']}: "
        f"accuracy {report['accuracy']:.3f}, F1 {report['f1']:.3f} (precision {report['precision']:.3f}, "
        f"recall {report['recall']:.3f}), rule match {report['rule_match']:.3f}"
    )
    matrix = Table("", "predicted 1", "predicted 0", "no answer", title="confusion matrix (1 = violation)")
    matrix.add_row("label 1", str(c["tp"]), str(c["fn"]), "-")
    matrix.add_row("label 0", str(c["fp"]), str(c["tn"]), "-")
    matrix.add_row("all", "", "", str(c["no_answer"]))
    console.print(matrix)
    traps = report["false_positive_traps"]
    console.print(
        f"false-positive traps flagged: {traps['flagged']}/{traps['rows']}; hallucinated citations: "
        f"{report['hallucinated_citations']}; schema violations: {report['schema_violations']}; latency "
        f"p50 {report['latency_ms']['p50']} ms p95 {report['latency_ms']['p95']} ms; completion tokens mean "
        f"{report['completion_tokens']['mean']} total {report['completion_tokens']['total']}"
    )
    for err in report["errors"][:15]:
        console.print(f"  [yellow]wrong[/] label {err['label']} ({err['expected_rule']}) -> {err['predicted']} "
                      f"{err['cited']} conf {err['confidence']}: {err['text']!r}" + (f" {err['error']}" if err["error"] else ""))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if report["accuracy"] < min_accuracy:
        raise typer.Exit(1)
