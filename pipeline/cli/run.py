"""``modpipe worker | demo | chaos``: run a worker role, or the whole pipeline on the local stack."""

from __future__ import annotations

import asyncio
import logging
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


# What the local stack carries on a 2-core machine shared with other work, with room to spare: the whole pipeline's
# knee measured there (`modpipe bench capacity`, docs/BENCHMARKS.md "Capacity": p95 under 1 s up to ~45 items/s)
# at under half, since the demo's machine may be busier than the one it was measured on.
DEMO_RATE = 20.0


def demo(
    ctx: typer.Context,
    items: int = typer.Option(200, help="How many items to publish."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the report as JSON here."),
    rate: float = typer.Option(DEMO_RATE, help="Items per second (0: as fast as possible). The default is one the "
                               "local stack carries on 2 cores; above the whole pipeline's knee (`modpipe bench "
                               "capacity`) latency grows with every item."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for every item to settle."),
    warm: bool = typer.Option(False, "--warm", help="Share one Redis keyspace with earlier --warm runs, so the "
                              "reasoner's verdict cache is warm (default: a fresh keyspace, cold caches)."),
) -> None:
    """Run the whole pipeline on the local stack with sample traffic and report what happened."""
    from pipeline.errors import StackError
    from pipeline.harness.demo import run_demo

    state_dir = settings(ctx).state_dir
    setup_logging("WARNING")
    try:
        report = asyncio.run(run_demo(items, json_out, rate, timeout, state_dir, console, warm=warm))
    except StackError as exc:
        fail(str(exc))
    if not report["settled"] or report["duplicate_final_verdicts"] or report["journey_errors"]:
        raise typer.Exit(2)


def chaos(
    ctx: typer.Context,
    items: int = typer.Option(300, help="Valid items to publish."),
    malformed: int = typer.Option(10, help="Malformed messages to publish."),
    kill: Optional[str] = typer.Option(
        None, "--kill", help="What to kill -9 mid-stream: worker (of --role; its supervisor restarts it), redis, "
        "broker or triton (kept down --down-s, then restarted on its own ports)."
    ),
    kill_worker: bool = typer.Option(False, "--kill-worker", help="Same as --kill worker."),
    role: str = typer.Option("triage", help="Which worker role --kill worker kills."),
    workers: int = typer.Option(1, min=1, help="Workers of that role (2+: the kill and restart each rebalance)."),
    poison: bool = typer.Option(False, "--poison", help="Add hostile messages: oversized, deep, invalid encodings, "
                                "huge keys, headers."),
    durable: bool = typer.Option(True, "--durable/--memory", help="When chaos starts the stack: durable storage "
                                 "(broker on local S3, Redis append-only) or memory."),
    down_s: float = typer.Option(10.0, "--down-s", help="How long a killed service stays down."),
    json_out: Optional[Path] = typer.Option(None, "--json-out"),
    rate: float = typer.Option(50.0, help="Items per second."),
    timeout: float = typer.Option(600.0),
) -> None:
    """A fault drill: bad and hostile input plus a kill -9; reports loss, duplicates, dead letters by reason,
    released-while-unreviewed and time to recover. Exits 2 when a target is missed."""
    from pipeline.app import Role
    from pipeline.errors import StackError
    from pipeline.harness.demo import chaos_passed, run_chaos

    state_dir = settings(ctx).state_dir
    setup_logging("WARNING")
    # The drill's own clients log every refused connection while the broker is down; the report says what matters.
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    try:
        report = asyncio.run(
            run_chaos(items, malformed, kill_worker, Role(role), json_out, rate, timeout, state_dir, console,
                      workers_of_role=workers, kill=kill, poison=poison, durable=durable, down_s=down_s)
        )
    except StackError as exc:
        fail(str(exc))
    if not chaos_passed(report):
        raise typer.Exit(2)
