"""``modpipe policy lint``, ``policy test`` and ``policy import``: policies treated as software.

lint checks every folder and exits 1 on an error (what breaks the prompt: an empty text, harmony control tokens);
the guide's advice (sections, the output format stated and restated, an escalation path, one rule-id prefix,
400-600 o200k tokens, examples and golden rows that cite real rules) is reported as warnings, which ``--strict``
makes fail too. test runs golden sets against a reasoner endpoint (accuracy, F1, calibration with a reliability
plot, truncated/unparseable answers, tokens) and exits 1 when accuracy falls below ``--min-accuracy``. import makes
a policy folder from a policy written in the gpt-oss-safeguard guide's formats, with a golden set converted from
CSV. Lint never reads the shared datasets folder; test resolves the golden references from it
(``MODPIPE_DATASETS_DIR``).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from pipeline.cli.common import console, fail, settings
from pipeline.cli.policy_lifecycle import register as register_lifecycle

policy_app = typer.Typer(help="Policies: lint, test against a reasoner, import; versions, shadow, backtest, promote, "
                         "roll back, retroact.", no_args_is_help=True)


def _library(ctx: typer.Context, strict: bool):  # type: ignore[no-untyped-def]
    from pipeline.errors import PolicyError
    from pipeline.policies import PolicyLibrary

    try:
        return PolicyLibrary.from_settings(settings(ctx).reasoner, strict=strict)
    except PolicyError as exc:
        fail(str(exc))


@policy_app.command("lint")
def policy_lint(
    ctx: typer.Context,
    strict: bool = typer.Option(False, "--strict", help="Exit 1 on warnings too (the guide's advice)."),
) -> None:
    """Check every policy folder and its candidates; exit 1 on errors (and on warnings with --strict)."""
    from pipeline.errors import PolicyError
    from pipeline.policies import count_tokens, lint_policy
    from pipeline.policies.lint import ERROR
    from pipeline.policies.versions import candidate_files, load_version

    library = _library(ctx, strict=False)
    table = Table("policy", "version", "severity", "tokens", "rules", "golden", "result")
    errors = warnings = 0
    versions = []
    for base in library:
        versions.append((base.policy_id, base))
        for path in candidate_files(base.folder) if base.folder else []:
            try:
                loaded = load_version(base.folder, path.read_text(encoding="utf-8"), path.name,
                                      settings(ctx).reasoner)
            except (PolicyError, UnicodeDecodeError) as exc:
                fail(f"{path}: {exc}")
            versions.append((f"{base.policy_id} ({path.stem})", loaded))
    for label, policy in versions:
        found = lint_policy(policy)
        errors += sum(f.level == ERROR for f in found)
        warnings += sum(f.level != ERROR for f in found)
        messages = "; ".join(f"[red]{escape(f.message)}[/]" if f.level == ERROR else f"[yellow]{escape(f.message)}[/]"
                             for f in found)
        kind = policy.answer_format.kind
        result = f"[green]ok[/] ({kind})" if not found else f"({kind}) {messages}"
        table.add_row(
            label, policy.version, policy.severity + (" high-risk" if policy.high_risk else ""),
            str(count_tokens(policy.text)), str(len(policy.rules)), str(len(policy.golden)), result,
        )
    console.print(table)
    console.print(f"{errors} errors, {warnings} warnings")
    if errors or (strict and warnings):
        raise typer.Exit(1)


def _print_report(report: dict) -> None:
    c = report["confusion"]
    console.print(
        f"[bold]{report['policy']}[/] {report['version']} on {report['model']} at effort {report['effort']} "
        f"({escape(report['answer_format'])}): accuracy {report['accuracy']:.3f}, F1 {report['f1']:.3f} "
        f"(precision {report['precision']:.3f}, recall {report['recall']:.3f})"
        + (f", rule match {report['rule_match']:.3f}" if report["rule_match"] is not None else "")
    )
    matrix = Table("", "predicted 1", "predicted 0", "no answer", title="confusion matrix (1 = violation)")
    matrix.add_row("label 1", str(c["tp"]), str(c["fn"]), "-")
    matrix.add_row("label 0", str(c["fp"]), str(c["tn"]), "-")
    matrix.add_row("all", "", "", str(c["no_answer"]))
    console.print(matrix)
    cal = report["calibration"]
    ece = ", ".join(f"{name} ECE {cal[name]['ece']:.3f} (Brier {cal[name]['brier']:.3f}, {cal[name]['rows']} rows)"
                    for name in ("self_report", "logprob") if cal.get(name)) or "no probabilities"
    traps = report["false_positive_traps"]
    console.print(
        f"calibration: {ece}; truncated {report['truncated']}, unparseable {report['unparseable']} "
        f"(share {report['truncated_or_unparseable_share']:.3f}); false-positive traps flagged: "
        f"{traps['flagged']}/{traps['rows']}; hallucinated citations: {report['hallucinated_citations']}; format "
        f"departures: {report['schema_violations']}; latency p50 {report['latency_ms']['p50']} ms p95 "
        f"{report['latency_ms']['p95']} ms; tokens per call in {report['prompt_tokens']['mean']} out "
        f"{report['completion_tokens']['mean']}"
    )
    for err in report["errors"][:15]:
        console.print(f"  [yellow]wrong[/] label {err['label']} ({err['expected_rule'] or '-'}) -> {err['predicted']} "
                      f"{err['cited']} conf {err['confidence']} p {err['p_violation']}: {escape(repr(err['text']))}"
                      + (f" {escape(err['error'])}" if err["error"] else ""))


@policy_app.command("test")
def policy_test(
    ctx: typer.Context,
    policy: Optional[str] = typer.Argument(None, help="Policy id (folder name), e.g. violence; --all for every one."),
    reasoner: str = typer.Option(
        ..., "--reasoner",
        help="triton://host:port/MODEL, http(s)://host:port/v1 (OpenAI-compatible) or ollama://host:port/MODEL.",
    ),
    all_policies: bool = typer.Option(False, "--all", help="Test every policy that has a golden set."),
    candidate: Optional[str] = typer.Option(
        None, "--candidate", help="Test this version of POLICY instead of its base: a candidate's name, its hash or "
        "a unique prefix (candidates/ in the policy's folder)."),
    model: Optional[str] = typer.Option(None, "--model", help="Model name for an OpenAI-compatible endpoint."),
    effort: Optional[str] = typer.Option(None, "--effort", help="low, medium or high (default: the policy's first)."),
    concurrency: int = typer.Option(8, "--concurrency", help="Golden rows judged at once."),
    timeout_s: float = typer.Option(300.0, "--timeout-s", help="Timeout per call."),
    min_accuracy: float = typer.Option(0.0, "--min-accuracy", help="Exit 1 below this accuracy (any policy)."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the full report here."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the reliability plot (PNG) here."),
) -> None:
    """Run golden sets against a reasoner: accuracy, F1, calibration, truncated answers, tokens and latency."""
    from pipeline.errors import PolicyError
    from pipeline.policies.golden import backend_for, parse_endpoint, reliability_plot, run_golden
    from pipeline.schemas import Effort

    if (policy is None) == (not all_policies):
        fail("name one POLICY or pass --all", code=2)
    if candidate is not None and policy is None:
        fail("--candidate needs one POLICY", code=2)
    library = _library(ctx, strict=True)
    if candidate is not None:
        from pipeline.policies import PolicyLibrary
        from pipeline.policies.versions import find_version, load_version

        try:
            base = library.get(policy)  # type: ignore[arg-type]
            found = find_version(base.folder, candidate) if base.folder else None
        except PolicyError as exc:
            fail(str(exc))
        if found is None:
            fail(f"policy {policy} has no version {candidate!r} in {base.folder / 'candidates'}")
        library = PolicyLibrary({base.policy_id: load_version(base.folder, found.text, found.path.name,
                                                              settings(ctx).reasoner)})
    configured = settings(ctx).reasoner
    try:
        endpoint = parse_endpoint(reasoner, model or configured.openai_model)
        chosen = Effort(effort) if effort else None
    except ValueError as exc:
        fail(str(exc), code=2)
    api_key = configured.openai_api_key.get_secret_value() if configured.openai_api_key else None
    ids = [p.policy_id for p in library if p.golden] if all_policies else [policy]
    reports = []
    for policy_id in ids:
        backend = backend_for(endpoint, timeout_s, api_key, configured)
        try:
            report = asyncio.run(run_golden(library, policy_id, backend, datasets_dir=settings(ctx).datasets_dir,
                                            effort=chosen, concurrency=concurrency, timeout_s=timeout_s,
                                            reasoner_settings=configured))
        except PolicyError as exc:  # unknown policy, no golden set, a golden reference that does not resolve
            fail(str(exc))
        _print_report(report)
        reports.append(report)
    if plot is not None:
        console.print(f"reliability plot: {reliability_plot(reports, plot)}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(reports[0] if policy is not None else reports, indent=2) + "\n")
    if any(r["accuracy"] < min_accuracy for r in reports):
        raise typer.Exit(1)


@policy_app.command("import")
def policy_import(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="The policy: a .md/.txt file, or a folder holding one."),
    policy_id: str = typer.Option(..., "--id", help="The new policy's id (its folder name)."),
    golden: list[Path] = typer.Option([], "--golden", help="A CSV of labelled examples (repeatable)."),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="CSV text column (name or 0-based)."),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="CSV label column (name or 0-based)."),
    rule_column: Optional[str] = typer.Option(None, "--rule-column", help="CSV column with the rule id, if any."),
    violation_values: Optional[str] = typer.Option(None, "--violation-values", help="Comma-separated label values "
                                                   "meaning a violation (default: 1, true, INVALID, unsafe, ...)."),
    safe_values: Optional[str] = typer.Option(None, "--safe-values", help="Comma-separated label values meaning safe."),
    name: Optional[str] = typer.Option(None, "--name", help="Display name (default: the policy's title)."),
    severity: str = typer.Option("medium", "--severity", help="low, medium, high or critical."),
    scope: str = typer.Option("on_request", "--scope", help="on_request (judged when named) or default."),
    out: Optional[Path] = typer.Option(None, "--out", help="Policies folder to write into (default: the configured)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing folder of that id."),
) -> None:
    """Make a policy folder from a policy in the gpt-oss-safeguard guide's formats (text copied unchanged)."""
    from pipeline.errors import PolicyError
    from pipeline.policies.importer import GoldenSource, import_policy
    from pipeline.policies.lint import ERROR

    def values(raw: str | None) -> tuple[str, ...]:
        return tuple(v.strip() for v in raw.split(",") if v.strip()) if raw else ()

    sources = [GoldenSource(path, text_column, label_column, rule_column, values(violation_values), values(safe_values))
               for path in golden]
    try:
        report = import_policy(src, policy_id, out or settings(ctx).reasoner.policies_dir, golden=sources, name=name,
                               severity=severity, scope=scope, force=force)
    except (PolicyError, OSError) as exc:
        fail(str(exc))
    policy = report.policy
    console.print(f"imported [bold]{policy.policy_id}[/] {policy.version} into {report.folder}: "
                  f"{len(policy.rules)} rules, {len(policy.examples)} examples, answer format "
                  f"{escape(report.answer_format.describe())} ({report.answer_format.source}), "
                  f"{report.golden_rows} golden rows" + (f" (skipped: {report.skipped})" if report.skipped else ""))
    for finding in report.findings:
        colour = "red" if finding.level == ERROR else "yellow"
        console.print(f"  [{colour}]{finding.level}[/] {escape(finding.message)}")
    if any(f.level == ERROR for f in report.findings):
        raise typer.Exit(1)


register_lifecycle(policy_app)
