"""``modpipe triage train | eval | build-embedder``: the triage classifier's CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import console, fail, settings

triage_app = typer.Typer(help="The triage classifier: train, evaluate, build its embedder.", no_args_is_help=True)

def _parse_high_risk(spec: str) -> dict[str, float]:
    """``"SH=0.95,S3=0.90"`` -> ``{"SH": 0.95, "S3": 0.9}``; ``"none"`` -> ``{}``."""
    if spec.strip().lower() in ("", "none"):
        return {}
    out: dict[str, float] = {}
    for part in spec.split(","):
        code, _, recall = part.partition("=")
        out[code.strip()] = float(recall)
    return out


@triage_app.command("train")
def triage_train(
    ctx: typer.Context,
    out: Path = typer.Option(Path("triage_models/artifacts/current"), help="Artefact folder to write."),
    target_accuracy: float = typer.Option(0.97, help="Accuracy required of auto-decided items (nested CV)."),
    feedback: Optional[Path] = typer.Option(
        None, "--feedback", help="Reviewer decisions (JSON lines exported by the review service) to train on too."
    ),
    embedder: str = typer.Option("onnx-int8", help="Embedder the heads are trained on: onnx-int8 | torch."),
    high_risk: str = typer.Option(
        "SH=0.95,S3=0.90",
        help="Categories forced to escalate (never auto-blocked) at or above a level catching this out-of-fold "
        "recall; 'none' turns it off.",
    ),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the triage heads on the OpenAI moderation set (+ feedback), choose nested thresholds, write the artefact.

    The data set is read from the datasets folder (MODPIPE_DATASETS_DIR).
    """
    from triage_models.train import train

    if feedback is not None and not feedback.is_file():
        fail(f"feedback file {feedback} does not exist")
    logging.basicConfig(level=logging.WARNING)
    try:
        card = train(out, datasets_dir=settings(ctx).datasets_dir, target_accuracy=target_accuracy, seed=seed,
                     progress=progress, feedback=feedback, embedder_backend=embedder,
                     high_risk_recall=_parse_high_risk(high_risk))
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    m = card["metrics"]
    console.print_json(json.dumps({
        "version": card["version"], "out": str(out), "roc_auc": m["roc_auc"], "pr_auc": m["pr_auc"], "f1": m["f1"],
        "auto_accuracy": m["auto_accuracy"], "escalation_rate": m["escalation_rate"], "target_met": m["target_met"],
        "thresholds": {k: v for k, v in card["thresholds"].items() if k != "head_bands"},
        "seconds": card["training"]["seconds"]}))


@triage_app.command("eval")
def triage_eval(
    ctx: typer.Context,
    dataset: str = typer.Option(
        "openai_moderation",
        help="openai_moderation | xstest | hatecheck (read from MODPIPE_DATASETS_DIR), or a JSON-lines file "
        "(feedback format).",
    ),
    cv: Optional[int] = typer.Option(None, "--cv", min=2, help="Train and score in K folds instead of using the artefact."),
    json_out: Path = typer.Option(Path("out/triage-eval.json"), "--json-out"),
    plots_dir: Optional[Path] = typer.Option(None, help="Where the PNG plots go (default: next to --json-out)."),
    model_dir: Optional[Path] = typer.Option(None, help="Artefact to evaluate (default: settings.triage.model_dir)."),
    embedder: str = typer.Option("onnx-int8", help="onnx-int8 | torch."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Metrics (ROC/PR-AUC, F1, precision, recall, auto-decided accuracy, escalation rate, per category) + plots."""
    from pipeline.reports import write_json
    from pipeline.triage import TriageArtefactError
    from pipeline.triage.eval import evaluate

    logging.basicConfig(level=logging.WARNING)
    try:
        report = evaluate(dataset, datasets_dir=settings(ctx).datasets_dir, cv=cv, model_dir=model_dir,
                          embedder_backend=embedder, progress=progress, plots_dir=plots_dir or json_out.parent)
    except (FileNotFoundError, ValueError, TriageArtefactError) as exc:
        fail(str(exc))
        return
    write_json(json_out, report)
    keys = ("dataset", "mode", "rows", "roc_auc", "pr_auc", "f1", "precision", "recall", "auto_accuracy",
            "escalation_rate", "in_sample", "plots")
    console.print_json(json.dumps({k: report[k] for k in keys if k in report}, default=str))


@triage_app.command("build-embedder")
def triage_build_embedder(
    out: Optional[Path] = typer.Option(None, help="Folder (default: triage_models/artifacts/embedders/...)."),
) -> None:
    """Re-create the int8 ONNX embedder from the wheel's model (needs torch; reproducible with the same versions)."""
    from triage_models.onnx_export import build_int8

    record = build_int8(out)
    console.print_json(json.dumps({k: record[k] for k in ("name", "sha256", "bytes", "tools")}))
