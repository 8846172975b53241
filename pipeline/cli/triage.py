"""``modpipe triage train | eval | compare | ceiling | harvest | retrain | prior | stream | simulate | build-embedder``."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import typer

from pipeline.cli.common import console, fail, settings

triage_app = typer.Typer(help="The triage classifier: train, evaluate, compare embedders, learn from verdicts.",
                         no_args_is_help=True)

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
    extras: str = typer.Option(
        "all", help="Extra public training sets (train splits): 'all', 'none' or names, comma-separated "
        "(davidson, convabuse, edos, hatemoji_build)."
    ),
    extra_weight: float = typer.Option(0.5, help="Their total weight as a share of the calibration rows' weight."),
    lexical: bool = typer.Option(True, "--lexical/--no-lexical", help="Stack hashed character n-grams on `any`."),
    category_routing: str = typer.Option("block", help="How category bands route: none | block | both."),
    learning_rows: Optional[Path] = typer.Option(
        None, "--rows", help="Learning rows (`modpipe triage harvest`) to train on as calibration rows."
    ),
    previous: Optional[Path] = typer.Option(
        None, help="The artefact this one replaces (default: --out if it holds one): compared in the model card."
    ),
    seed: int = typer.Option(0),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Train the triage heads on the OpenAI moderation set (+ extras, feedback), choose nested thresholds, write the
    artefact with its model card.

    The data sets are read from the datasets folder (MODPIPE_DATASETS_DIR).
    """
    import shutil
    import tempfile

    from triage_models.loop import load_rows_file
    from triage_models.train import parse_sources, train

    if feedback is not None and not feedback.is_file():
        fail(f"feedback file {feedback} does not exist")
    if category_routing not in ("none", "block", "both"):
        fail("--category-routing must be none, block or both")
    logging.basicConfig(level=logging.WARNING)
    keep = None
    if previous is None and (out / "model_card.json").is_file():
        keep = Path(tempfile.mkdtemp(prefix="triage-previous-"))
        shutil.copytree(out, keep / "artefact")
        previous = keep / "artefact"
    try:
        card = train(out, datasets_dir=settings(ctx).datasets_dir, target_accuracy=target_accuracy, seed=seed,
                     progress=progress, feedback=feedback, embedder_backend=embedder,
                     high_risk_recall=_parse_high_risk(high_risk),
                     extra_sources=None if extras == "all" else parse_sources(extras), extra_weight=extra_weight,
                     lexical=lexical, category_routing=category_routing, previous_dir=previous,
                     learning=load_rows_file(learning_rows) if learning_rows is not None else None)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    finally:
        if keep is not None:
            shutil.rmtree(keep, ignore_errors=True)
    m = card["metrics"]
    console.print_json(json.dumps({
        "version": card["version"], "out": str(out), "roc_auc": m["roc_auc"], "pr_auc": m["pr_auc"], "f1": m["f1"],
        "auto_accuracy": m["auto_accuracy"], "escalation_rate": m["escalation_rate"], "target_met": m["target_met"],
        "route": m.get("route"), "previous": (card.get("comparison") or {}).get("previous"),
        "thresholds": {k: v for k, v in card["thresholds"].items() if k != "head_bands"},
        "seconds": card["training"]["seconds"]}))


@triage_app.command("eval")
def triage_eval(
    ctx: typer.Context,
    dataset: str = typer.Option(
        "openai_moderation",
        help="A data set name (openai_moderation, xstest, hatecheck, realistic_mix, multilingual_mix, davidson_test, "
        "convabuse_test, wiki_toxicity, hatemoji_check, simple_safety_tests, germeval_test, dkhate_test, cold_test, "
        "mhc_<language>, ...; read from MODPIPE_DATASETS_DIR), or a JSON-lines file (feedback format).",
    ),
    cv: Optional[int] = typer.Option(None, "--cv", min=2, help="Train and score in K folds instead of using the artefact."),
    json_out: Path = typer.Option(Path("out/triage-eval.json"), "--json-out"),
    plots_dir: Optional[Path] = typer.Option(None, help="Where the PNG plots go (default: next to --json-out)."),
    model_dir: Optional[Path] = typer.Option(None, help="Artefact to evaluate (default: settings.triage.model_dir)."),
    embedder: str = typer.Option("onnx-int8", help="onnx-int8 | torch."),
    prior: str = typer.Option(
        "off", help="Artefact mode: replay the rows through a prior correction: off | adaptive (the worker's EM "
        "estimate, batch by batch) | oracle (the set's true violation rate)."
    ),
    miss_budget: float = typer.Option(
        0.2, help="With --prior adaptive|oracle: the allow level is capped so auto-allowed items hold at most this "
        "share of the expected violations (1 disables the cap), as MODPIPE_TRIAGE__PRIOR_MISS_BUDGET does."
    ),
    language_gate: bool = typer.Option(True, "--language-gate/--no-language-gate",
                                       help="Apply the artefact's language rule to the route."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Metrics (ROC/PR-AUC, F1, precision, recall, auto-decided accuracy, escalation rate, per category, the whole
    route) + plots."""
    from pipeline.reports import write_json
    from pipeline.triage import TriageArtefactError
    from pipeline.triage.eval import evaluate

    logging.basicConfig(level=logging.WARNING)
    try:
        report = evaluate(dataset, datasets_dir=settings(ctx).datasets_dir, cv=cv, model_dir=model_dir,
                          embedder_backend=embedder, progress=progress, plots_dir=plots_dir or json_out.parent,
                          prior=prior, language_gate=language_gate,
                          miss_budget=miss_budget if miss_budget < 1 else None)
    except (FileNotFoundError, ValueError, TriageArtefactError) as exc:
        fail(str(exc))
        return
    write_json(json_out, report)
    keys = ("dataset", "mode", "rows", "roc_auc", "pr_auc", "f1", "precision", "recall", "auto_accuracy",
            "escalation_rate", "route", "prior", "in_sample", "plots")
    console.print_json(json.dumps({k: report[k] for k in keys if k in report}, default=str))


@triage_app.command("build-embedder")
def triage_build_embedder(
    out: Optional[Path] = typer.Option(None, help="Folder (default: triage_models/artifacts/embedders/...)."),
) -> None:
    """Re-create the int8 ONNX embedder from the wheel's model (needs torch; reproducible with the same versions)."""
    from triage_models.onnx_export import build_int8

    record = build_int8(out)
    console.print_json(json.dumps({k: record[k] for k in ("name", "sha256", "bytes", "tools")}))


def _measure_and_report(measure: Callable[[list[str]], dict[str, Any]], embedders: str, json_out: Path,
                        table: Callable[[dict[str, Any]], str]) -> None:
    """What `compare` and `ceiling` share: run the measurement over the comma-separated embedders, write its JSON,
    print its table; a missing data set or an unknown or uninstalled candidate is a clear error, not a trace."""
    from pipeline.reports import write_json

    logging.basicConfig(level=logging.WARNING)
    try:
        report = measure([e.strip() for e in embedders.split(",") if e.strip()])
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    write_json(json_out, report)
    console.print(table(report))


@triage_app.command("compare")
def triage_compare(
    ctx: typer.Context,
    embedders: str = typer.Option("minilm-int8,minilm-fp32,use-m3,e5-small-q4",
                                  help="Candidate embedders (triage_models/candidates.py), comma-separated."),
    json_out: Path = typer.Option(Path("out/triage-compare.json"), "--json-out"),
    speed_texts: int = typer.Option(128, help="OpenAI-set texts timed per embedder (alternating rounds)."),
    rounds: int = typer.Option(2, help="Timing rounds (best round kept)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Embedders x heads on the same folds of the OpenAI set: ROC-AUC, nested escalation and accuracy, speed vs the
    sentence-transformers baseline, memory. Embeddings are cached on disk (each set once per embedder)."""
    from triage_models.compare import compare, markdown_table

    _measure_and_report(lambda names: compare(names, datasets_dir=settings(ctx).datasets_dir, speed_texts=speed_texts,
                                              rounds=rounds, progress=progress),
                        embedders, json_out, markdown_table)


@triage_app.command("ceiling")
def triage_ceiling(
    ctx: typer.Context,
    embedders: str = typer.Option("minilm-int8,use-m3,e5-small-q4",
                                  help="Candidate embedders the stacks may use (triage_models/candidates.py)."),
    json_out: Path = typer.Option(Path("out/triage-ceiling.json"), "--json-out"),
    speed_texts: int = typer.Option(128, help="OpenAI-set texts timed per embedder (alternating rounds)."),
    rounds: int = typer.Option(2, help="Timing rounds (best round kept)."),
    curves: bool = typer.Option(True, "--curves/--no-curves",
                                help="Learning curves of two stacks (a quarter to all of the training rows)."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Stacks of every view (embedders with logistic or RBF heads, the lexical view) on the OpenAI set: ROC-AUC,
    nested and hindsight escalation at the accuracy target, speed vs the baseline. Answers whether any cheap
    combination reaches the issue-11 targets, and by how much the best one misses."""
    from pipeline.harness.traffic import sample_texts
    from triage_models.ceiling import ceiling, markdown_table

    _measure_and_report(lambda names: ceiling(names, datasets_dir=settings(ctx).datasets_dir, speed_texts=speed_texts,
                                              rounds=rounds, progress=progress,
                                              short_texts=sample_texts(speed_texts, seed=7), curves=curves),
                        embedders, json_out, markdown_table)


@triage_app.command("harvest")
def triage_harvest(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Learning rows to write (JSON lines; content: keep it private)."),
    from_kafka: bool = typer.Option(False, "--from-kafka", help="Read the four topics from the configured broker."),
    escalations: Optional[Path] = typer.Option(None, help="JSON lines of Escalation messages (a topic dump)."),
    verdicts: Optional[Path] = typer.Option(None, help="JSON lines of Verdict messages."),
    decisions: Optional[Path] = typer.Option(None, help="JSON lines of ReviewDecision messages."),
    review_tasks: Optional[Path] = typer.Option(None, "--review", help="JSON lines of ReviewTask messages."),
    feedback: Optional[Path] = typer.Option(None, help="A review-service export (`modpipe review export`)."),
    min_confidence: float = typer.Option(0.7, help="Reasoner verdicts below this self-reported confidence are skipped."),
) -> None:
    """Final verdicts and reviewer decisions -> labelled learning rows with provenance (reviewers outrank models)."""
    import asyncio

    from pipeline.triage.model import THRESHOLDS_FILE
    from triage_models.loop import harvest, read_topics, write_rows

    cfg = settings(ctx)
    streams: dict[str, list] = {"escalations": [], "verdicts": [], "decisions": [], "review_tasks": []}
    if from_kafka:
        k = cfg.kafka
        names = {"escalations": k.topic(k.escalations_topic), "verdicts": k.topic(k.verdicts_topic),
                 "decisions": k.topic(k.decisions_topic), "review_tasks": k.topic(k.review_topic)}
        try:
            read = asyncio.run(read_topics(k, list(names.values())))
        except Exception as exc:  # noqa: BLE001 - one line for the operator, whatever the client raised
            fail(f"cannot read the topics from {k.bootstrap_servers}: {type(exc).__name__}: {exc}")
            return
        for key, topic in names.items():
            streams[key] = read[topic]
    for key, path in (("escalations", escalations), ("verdicts", verdicts), ("decisions", decisions),
                      ("review_tasks", review_tasks)):
        if path is not None:
            streams[key] += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    try:
        policies = json.loads((cfg.triage.model_dir / THRESHOLDS_FILE).read_text()).get("category_policies", {})
    except OSError:
        policies = {}
    result = harvest(**streams, feedback=feedback, category_policies=policies, min_confidence=min_confidence)
    write_rows(out, result.rows)
    console.print_json(json.dumps({"out": str(out), **result.counts}))


@triage_app.command("retrain")
def triage_retrain(
    ctx: typer.Context,
    rows: Path = typer.Option(..., "--rows", help="Learning rows (`modpipe triage harvest`) or a review export."),
    out: Path = typer.Option(Path(".modpipe/triage/candidate"), help="Where the candidate artefact is written."),
    target_accuracy: float = typer.Option(0.97),
    holdout: float = typer.Option(0.2, help="Share of the rows held back (never trained on) for the comparison."),
    promote: bool = typer.Option(True, "--promote/--no-promote", help="Replace the artefact in service if it wins."),
    nested: bool = typer.Option(True, "--nested/--fast", help="Nested CV metrics in the card (slower) or not."),
) -> None:
    """Build a candidate from the base recipe + learning rows; promote it only if it beats the current artefact
    (settings.triage.model_dir) on held-back rows. The comparison is written into the candidate's model card."""
    from triage_models.loop import read_rows, resolve, retrain

    cfg = settings(ctx)
    logging.basicConfig(level=logging.WARNING)
    try:
        # A review export has the same text/label/source/decided_at keys: both files read the same way.
        learning = resolve({"source": "review", "decided_at": "", **row} for row in read_rows(rows))
        result = retrain(learning, datasets_dir=cfg.datasets_dir, model_dir=cfg.triage.model_dir, out_dir=out,
                         target_accuracy=target_accuracy, holdout_share=holdout, promote=promote, nested=nested)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    console.print_json(json.dumps(result, default=str))


@triage_app.command("prior")
def triage_prior(
    verdicts: Path = typer.Option(..., help="JSON lines of final Verdict messages (a moderation.verdicts dump)."),
) -> None:
    """The violation rate among observed final verdicts (for MODPIPE_TRIAGE__PRIOR_MODE=fixed)."""
    from pipeline.schemas import Decision, Verdict, VerdictStatus, parse_wire

    finals = [v for v in (parse_wire(Verdict, line) for line in verdicts.read_text().splitlines() if line.strip())
              if v.status is VerdictStatus.FINAL]
    latest = {}
    for v in finals:  # the last final verdict per item and revision (appeals supersede)
        latest[(v.content_id, v.revision)] = v
    blocked = sum(v.decision is Decision.BLOCK for v in latest.values())
    rate = blocked / len(latest) if latest else None
    console.print_json(json.dumps({"final_verdicts": len(latest), "blocked": blocked, "violation_rate": rate,
                                   "setting": f"MODPIPE_TRIAGE__PRIOR_MODE=fixed MODPIPE_TRIAGE__PRIOR_FIXED={rate:.4f}"
                                   if rate else None}))


@triage_app.command("stream")
def triage_stream(
    ctx: typer.Context,
    dataset: str = typer.Option("realistic_mix", help="A labelled data set name (as for eval) or feedback file."),
    out: Path = typer.Option(Path("out/triage-stream.jsonl"), help="Stream file (third-party text: never commit)."),
) -> None:
    """Write a labelled data set as a stream file for `modpipe triage simulate`."""
    from triage_models.data import load_dataset
    from triage_models.simulate import write_stream

    data = load_dataset(dataset, settings(ctx).datasets_dir)
    y, rows = data.any_labels()
    write_stream(out, [data.texts[i] for i in rows], y, data.name)
    console.print_json(json.dumps({"out": str(out), "rows": int(len(rows)), "violation_rate": float(y.mean())}))


@triage_app.command("simulate")
def triage_simulate(
    ctx: typer.Context,
    stream: Path = typer.Option(..., "--stream", help="Labelled stream (JSON lines with text and label)."),
    days: int = typer.Option(7, "--days", min=1),
    json_out: Path = typer.Option(Path("out/triage-simulate.json"), "--json-out"),
    prior: str = typer.Option("adaptive", help="adaptive | off."),
) -> None:
    """Replay a labelled stream as days of traffic; an ORACLE (the stream's labels) stands in for the reasoner;
    retrain and gate each day; plot escalation and auto-decided accuracy per day."""
    from pipeline.reports import write_json
    from triage_models.simulate import ORACLE_NOTE, plot, simulate

    cfg = settings(ctx)
    logging.basicConfig(level=logging.WARNING)
    console.print(f"[bold yellow]note:[/] {ORACLE_NOTE}")

    def show(day: dict) -> None:
        retrained = day.get("retrain", {})
        console.print(f"day {day['day']}: escalation {day['escalation_rate']:.3f}, auto-decided accuracy "
                      f"{day['auto_accuracy'] if day['auto_accuracy'] is None else round(day['auto_accuracy'], 4)}, "
                      f"model {day['model_version']}" + (f"; candidate {'promoted' if retrained['promoted'] else 'kept back'}"
                                                        f" ({retrained['reason']})" if retrained else ""))

    try:
        report = simulate(stream, days=days, datasets_dir=cfg.datasets_dir, model_dir=cfg.triage.model_dir,
                          work_dir=cfg.state_dir / "triage" / "simulate", prior_mode=prior, on_day=show)
    except (FileNotFoundError, ValueError) as exc:
        fail(str(exc))
        return
    report["plot"] = str(plot(report, json_out.with_suffix(".png")))
    write_json(json_out, report)
    console.print_json(json.dumps({k: report[k] for k in ("stream", "rows", "violation_rate", "oracle", "plot")}))
