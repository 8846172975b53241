"""``modpipe worker | demo | chaos``: run a worker role, or the whole pipeline on the local stack."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.cli.common import console, fail, settings, setup_logging


def worker(ctx: typer.Context, role: str = typer.Option(..., "--role", help="triage | reasoning | review-intake")) -> None:
    """Run one worker role in the foreground (scale a role by running more of them)."""
    from pipeline.app import Role, run_worker

    try:
        chosen = Role(role)
    except ValueError:
        fail(f"unknown role {role!r}; choose one of: {', '.join(r.value for r in Role)}")
    config = settings(ctx)
    setup_logging(config.worker.log_level)
    sys.argv = [sys.argv[0], "worker"]  # Faust's worker parses argv: give it nothing of ours
    run_worker(config, chosen)


def demo(
    ctx: typer.Context,
    items: int = typer.Option(200, help="How many items to publish."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the report as JSON here."),
    rate: float = typer.Option(25.0, help="Items per second (0: as fast as possible)."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for every item to settle."),
) -> None:
    """Run the whole pipeline on the local stack with sample traffic and report what happened."""
    from pipeline.errors import StackError
    from pipeline.harness.demo import run_demo

    state_dir = settings(ctx).state_dir
    setup_logging("WARNING")
    try:
        report = asyncio.run(run_demo(items, json_out, rate, timeout, state_dir, console))
    except StackError as exc:
        fail(str(exc))
    if not report["settled"] or report["duplicate_final_verdicts"] or report["journey_errors"]:
        raise typer.Exit(2)


def chaos(
    ctx: typer.Context,
    items: int = typer.Option(300, help="Valid items to publish."),
    malformed: int = typer.Option(10, help="Malformed messages to publish."),
    kill_worker: bool = typer.Option(False, "--kill-worker", help="kill -9 a worker mid-stream and restart it."),
    role: str = typer.Option("triage", help="Which worker role to kill."),
    workers: int = typer.Option(1, min=1, help="Workers of that role (2+: the kill and restart each rebalance)."),
    json_out: Optional[Path] = typer.Option(None, "--json-out"),
    rate: float = typer.Option(50.0, help="Items per second."),
    timeout: float = typer.Option(600.0),
) -> None:
    """Bad input and a crashed worker: report lost items, duplicate final verdicts and dead letters."""
    from pipeline.app import Role
    from pipeline.errors import StackError
    from pipeline.harness.demo import run_chaos

    state_dir = settings(ctx).state_dir
    setup_logging("WARNING")
    try:
        report = asyncio.run(
            run_chaos(items, malformed, kill_worker, Role(role), json_out, rate, timeout, state_dir, console,
                      workers_of_role=workers)
        )
    except StackError as exc:
        fail(str(exc))
    if report["lost"] or report["duplicate_final_verdicts"] or report["dead_letters"] != malformed:
        raise typer.Exit(2)
