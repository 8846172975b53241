"""``modpipe bench spine | triage | reasoner | review | abuse | soak | gateway | stress | capacity``: benchmarks,
each writing its section of docs/BENCHMARKS.md (``stress`` only with ``--docs``: it is CI's gate).

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
    items: int = typer.Option(1000, help="Items per throughput round (and texts for the embedder alone)."),
    rounds: int = typer.Option(3, help="Alternating rounds, embedder alone then end to end; the best of each counts."),
    rate: float = typer.Option(10.0, help="Steady-load rate, items per second."),
    seconds: float = typer.Option(30.0, help="Steady-load duration."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-spine.json"), "--json-out"),
) -> None:
    """Triage items/s end to end vs the embedder alone (same texts), and verdict latency at a steady rate."""
    from pipeline.harness.bench.spine import run_spine_bench

    state_dir = settings(ctx).state_dir
    setup_logging("WARNING")
    asyncio.run(run_spine_bench(items, rate, seconds, json_out, state_dir, console, rounds=rounds))


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


@bench_app.command("abuse")
def bench_abuse(
    json_out: Optional[Path] = typer.Option(Path("out/bench-abuse.json"), "--json-out"),
    markdown: bool = typer.Option(True, "--markdown/--no-markdown", help="Update docs/BENCHMARKS.md."),
) -> None:
    """Attack a running review service (oversized bodies, echo, text limits, guessing, platform scope, revoked
    sessions, and what held before): reports what was tried and what held; exit 2 if anything did not hold."""
    from pipeline.harness.bench.abuse import run_abuse_bench

    setup_logging("WARNING")
    report = asyncio.run(run_abuse_bench(json_out, markdown, console))
    if report["failed"]:
        raise typer.Exit(2)


@bench_app.command("soak")
def bench_soak(
    ctx: typer.Context,
    rate: float = typer.Option(15.0, "--rate", help="Items per second."),
    minutes: float = typer.Option(10.0, "--minutes", help="How long to publish."),
    sample_s: float = typer.Option(10.0, "--sample-s", help="Seconds between samples of RSS, sockets and lag."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-soak.json"), "--json-out"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Write the Soak section of docs/BENCHMARKS.md."),
) -> None:
    """Steady load for minutes: RSS and open sockets per worker, lag per role and latency per minute, a plot."""
    from pipeline.harness.bench.soak import run_soak

    setup_logging("WARNING")
    report = asyncio.run(run_soak(rate, minutes, json_out, settings(ctx).state_dir, console, sample_s=sample_s,
                                  write_docs=docs))
    if not report["settled"] or not report["memory_ok"]:
        raise typer.Exit(2)


@bench_app.command("gateway")
def bench_gateway(
    ctx: typer.Context,
    batches: int = typer.Option(100, "--batches", help="POST /v1/items batch requests."),
    batch_size: int = typer.Option(50, "--batch-size", help="Items per batch (<= MODPIPE_GATEWAY__MAX_BATCH_ITEMS)."),
    singles: int = typer.Option(300, "--singles", help="POST /v1/items single-item requests."),
    moderate: int = typer.Option(60, "--moderate", help="POST /v1/moderate requests with new texts."),
    concurrency: int = typer.Option(4, "--concurrency", help="Requests in flight."),
    deadline_ms: int = typer.Option(2000, "--deadline-ms", help="The /v1/moderate deadline."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-gateway.json"), "--json-out"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Write the Gateway section of docs/BENCHMARKS.md."),
) -> None:
    """Gateway requests/s and p50/p99: /v1/items batches and single items, /v1/moderate new and known items."""
    from pipeline.harness.bench.gateway import run_gateway_bench

    setup_logging("WARNING")
    report = asyncio.run(run_gateway_bench(batches, batch_size, singles, moderate, concurrency, deadline_ms,
                                           json_out, settings(ctx).state_dir, console, write_docs=docs))
    refused = sum(n for phase in ("items_batches", "items_single", "moderate_new", "moderate_known")
                  for code, n in report[phase]["statuses"].items() if code not in ("200", "202"))
    if refused:
        raise typer.Exit(2)


@bench_app.command("stress")
def bench_stress(
    ctx: typer.Context,
    rate: float = typer.Option(10.0, "--rate", help="Offered load, items per second."),
    seconds: float = typer.Option(20.0, "--seconds", help="How long to offer it."),
    max_drop_rate: float = typer.Option(0.01, "--max-drop-rate", help="Largest share of items allowed to get no "
                                        "final verdict, review task or dead letter by the deadline."),
    max_p95_ms: float = typer.Option(2000.0, "--max-p95-ms", help="Largest p95 latency allowed for --p95-stage."),
    p95_stage: str = typer.Option("settle", "--p95-stage", help="Which latency the p95 bar applies to: triage "
                                  "(to the first verdict), reasoning (escalated items, to the reasoner's verdict or "
                                  "review task) or settle (every item, to its final verdict or review task)."),
    deadline_s: float = typer.Option(30.0, "--deadline-s", help="How long after publishing an item may still settle "
                                     "before it counts as dropped."),
    sample_s: float = typer.Option(2.0, "--sample-s", help="Seconds between consumer-lag samples."),
    warmup: int = typer.Option(20, "--warmup", help="Items published (and settled) before the measured load."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-stress.json"), "--json-out"),
    docs: bool = typer.Option(False, "--docs/--no-docs", help="Write the Stress section of docs/BENCHMARKS.md."),
) -> None:
    """A steady load through the whole pipeline: drop rate, p50/p95/p99 per stage, lag over time, cost per 1,000
    items; exits 2 when the drop rate or the p95 breaks its bar."""
    from pipeline.errors import StackError
    from pipeline.harness.bench.stress import STAGES, run_stress

    if p95_stage not in STAGES:
        fail(f"--p95-stage must be one of {', '.join(STAGES)}")
    setup_logging("WARNING")
    try:
        report = asyncio.run(run_stress(rate, seconds, max_drop_rate=max_drop_rate, max_p95_ms=max_p95_ms,
                                        p95_stage=p95_stage, deadline_s=deadline_s, sample_s=sample_s,
                                        warmup_items=warmup, json_out=json_out, state_dir=settings(ctx).state_dir,
                                        console=console, write_docs=docs))
    except StackError as exc:
        fail(str(exc))
    if not report["gate"]["passed"]:
        raise typer.Exit(2)


@bench_app.command("capacity")
def bench_capacity(
    ctx: typer.Context,
    stages: str = typer.Option("triage,reasoning-sleep,reasoning-standin,review-intake,pipeline", "--stages",
                               help="Comma-separated stages, measured in this order."),
    step_s: float = typer.Option(8.0, "--step-s", help="Seconds of offered load per step."),
    grace_s: float = typer.Option(10.0, "--grace-s", help="How long after a step its items may still finish."),
    factor: float = typer.Option(1.5, "--factor", help="Each step offers this many times the last one's load."),
    max_steps: int = typer.Option(8, "--max-steps", help="Most steps per stage."),
    max_p95_ms: float = typer.Option(1000.0, "--max-p95-ms", help="The bar: a step holds while its p95 is at most "
                                     "this (and at most 1 % of its items are unfinished after the grace)."),
    sleep_ms: float = typer.Option(200.0, "--sleep-ms", help="Latency of the bench model (reasoning-sleep)."),
    start: list[str] = typer.Option([], "--start", help="STAGE=RATE: the first offered load of a stage "
                                    "(repeatable; defaults per stage)."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-capacity.json"), "--json-out"),
    docs: bool = typer.Option(True, "--docs/--no-docs", help="Write the Capacity section of docs/BENCHMARKS.md."),
) -> None:
    """Step the offered load per stage (triage, reasoning against the sleep model and the stand-in, review intake,
    the whole pipeline) until p95 breaks the bar; plot and table of the knees."""
    from pipeline.errors import StackError
    from pipeline.harness.bench.capacity import STAGES, run_capacity

    chosen = [s.strip() for s in stages.split(",") if s.strip()]
    if not chosen or any(s not in STAGES for s in chosen):
        fail(f"--stages takes a comma-separated list of {', '.join(STAGES)}")
    starts: dict[str, float] = {}
    for entry in start:
        name, _, value = entry.partition("=")
        try:
            starts[name] = float(value)
        except ValueError:
            fail(f"--start takes STAGE=RATE, got {entry!r}")
    setup_logging("WARNING")
    try:
        asyncio.run(run_capacity(chosen, step_s=step_s, grace_s=grace_s, factor=factor, max_steps=max_steps,
                                 max_p95_ms=max_p95_ms, sleep_ms=sleep_ms, json_out=json_out,
                                 state_dir=settings(ctx).state_dir, console=console, write_docs=docs, starts=starts))
    except StackError as exc:
        fail(str(exc))
