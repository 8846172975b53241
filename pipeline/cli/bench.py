"""``modpipe bench spine | triage | reasoner | review``: benchmarks, each writing its section of docs/BENCHMARKS.md.

The benchmarks themselves live in :mod:`pipeline.harness.bench` (product code never imports the harness); these
commands are their thin entry points.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import console, fail, settings, setup_logging

bench_app = typer.Typer(help="Benchmarks that write docs/BENCHMARKS.md.", no_args_is_help=True)


@bench_app.command("spine")
def bench_spine(
    ctx: typer.Context,
    items: int = typer.Option(1000, help="Items for the throughput burst (and texts for the embedder alone)."),
    rate: float = typer.Option(20.0, help="Steady-load rate, items per second."),
    seconds: float = typer.Option(30.0, help="Steady-load duration."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-spine.json"), "--json-out"),
) -> None:
    """Triage items/s end to end vs the embedder alone, and verdict latency at a steady rate."""
    from pipeline.harness.bench.spine import run_spine_bench

    state_dir = settings(ctx).state_dir
    setup_logging("WARNING")
    asyncio.run(run_spine_bench(items, rate, seconds, json_out, state_dir, console))


@bench_app.command("triage")
def bench_triage(
    ctx: typer.Context,
    texts: int = typer.Option(256, help="Distinct texts timed per round for each embedder."),
    rounds: int = typer.Option(2, help="Alternating rounds; the best round of each embedder counts."),
    pipeline_items: int = typer.Option(300, help="Items published through Kafka (0 skips the pipeline part)."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-triage.json"), "--json-out"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Embedder texts/s vs sentence-transformers, pipeline items/s through Kafka, and ROC-AUC of both."""
    from pipeline.harness.bench.triage import run_triage_bench

    logging.basicConfig(level=logging.WARNING)
    try:
        run_triage_bench(settings(ctx), texts_n=texts, rounds=rounds, pipeline_items=pipeline_items,
                         json_out=json_out, console=console, progress=progress)
    except FileNotFoundError as exc:  # the labelled data set it scores ROC-AUC on (MODPIPE_DATASETS_DIR)
        fail(str(exc))


@bench_app.command("reasoner")
def bench_reasoner(
    ctx: typer.Context,
    latency_ms: float = typer.Option(200.0, "--latency-ms", help="How long the bench model sleeps per call."),
    concurrency: int = typer.Option(32, "--concurrency", help="Items judged at once (and calls in flight)."),
    items: int = typer.Option(2000, "--items", help="Items to judge."),
    duplicates: float = typer.Option(0.25, "--duplicates", help="Fraction of items repeating an earlier text."),
    json_out: Path = typer.Option(Path("out/bench-reasoner.json"), "--json-out"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Write the Reasoner section of docs/BENCHMARKS.md."),
) -> None:
    """Reasoning-stage items/s against a Triton model that sleeps L ms, and cache hits on repeated texts."""
    from pipeline.harness.bench.reasoner import run_reasoner_bench

    logging.basicConfig(level=logging.WARNING)
    report = asyncio.run(run_reasoner_bench(latency_ms, concurrency, items, duplicates, json_out,
                                            settings(ctx).state_dir, console, write_docs=docs))
    if report["errors"]:
        raise typer.Exit(1)


@bench_app.command("review")
def bench_review(
    reviewers: int = typer.Option(50, "--reviewers", help="Concurrent reviewer clients."),
    items: int = typer.Option(2000, "--items", help="Items to claim and decide."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-review.json"), "--json-out"),
    markdown: bool = typer.Option(True, "--markdown/--no-markdown", help="Update docs/BENCHMARKS.md."),
) -> None:
    """R reviewer clients claim and decide N items over HTTP: decided, double assigned, lost, claim latency."""
    from pipeline.harness.bench.review import run_review_bench

    report = asyncio.run(run_review_bench(reviewers, items, json_out, markdown, console))
    if report["decided"] != items or report["double_assigned"] or report["lost"]:
        raise typer.Exit(2)
