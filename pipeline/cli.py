"""``modpipe``: one CLI for every role and operation (workers, local stack, demo, chaos, inspection)."""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pipeline.config import Settings, load_settings

app = typer.Typer(help="modpipe: policy-driven, explainable content moderation.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack: Tansu broker, Redis, Triton (CPU).", no_args_is_help=True)
config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
visibility_app = typer.Typer(help="The visibility store.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that write docs/BENCHMARKS.md.", no_args_is_help=True)
for sub, name in (
    (stack_app, "stack"),
    (config_app, "config"),
    (visibility_app, "visibility"),
    (topics_app, "topics"),
    (bench_app, "bench"),
):
    app.add_typer(sub, name=name)

console = Console()
err_console = Console(stderr=True)


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


def _settings() -> Settings:
    try:
        return load_settings()
    except Exception as exc:  # noqa: BLE001 - pydantic's message says which variable is wrong
        _fail(f"invalid configuration: {exc}")
        raise


# -- stack -----------------------------------------------------------------------------------------------------


@stack_app.command("up")
def stack_up(
    no_triton: bool = typer.Option(False, "--no-triton", help="Start only the broker and Redis."),
    timeout: float = typer.Option(180.0, help="Seconds to wait for each service."),
) -> None:
    """Start the local stack on free loopback ports and record where it listens."""
    from pipeline import stack
    from pipeline.errors import StackError

    settings = _settings()
    try:
        info = stack.stack_up(settings.state_dir, redis_url=settings.redis.url, start_triton=not no_triton,
                              timeout_s=timeout)
    except StackError as exc:
        _fail(str(exc))
        return
    _print_stack(info)


@stack_app.command("down")
def stack_down() -> None:
    """Stop what `stack up` started (by PID)."""
    from pipeline import stack

    stopped = stack.stack_down(_settings().state_dir)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("status")
def stack_status() -> None:
    """Show where the local stack listens and whether each service is alive."""
    from pipeline import stack

    info = stack.stack_status(_settings().state_dir)
    if info is None:
        console.print("the local stack is not running")
        raise typer.Exit(1)
    _print_stack(info)


def _print_stack(info) -> None:  # type: ignore[no-untyped-def]
    from pipeline import stack

    alive = stack.service_alive(info)
    for name, service in info.services.items():
        state = "[green]up[/]" if alive.get(name) else "[red]down[/]"
        pid = f"pid {service.pid}" if service.pid else "external"
        console.print(f"{name:8} {state} {service.address:28} {pid}")
    console.print(f"env file: {info.state_dir / 'stack.env'}")


# -- workers ---------------------------------------------------------------------------------------------------


@app.command()
def worker(role: str = typer.Option(..., "--role", help="triage | reasoning | review-intake")) -> None:
    """Run one worker role in the foreground (scale a role by running more of them)."""
    from pipeline.app import Role, run_worker

    try:
        chosen = Role(role)
    except ValueError:
        _fail(f"unknown role {role!r}; choose one of: {', '.join(r.value for r in Role)}")
        return
    settings = _settings()
    _setup_logging(settings.worker.log_level)
    sys.argv = [sys.argv[0], "worker"]  # Faust's worker parses argv: give it nothing of ours
    run_worker(settings, chosen)


# -- demo and chaos ---------------------------------------------------------------------------------------------


@app.command()
def demo(
    items: int = typer.Option(200, help="How many items to publish."),
    json_out: Optional[Path] = typer.Option(None, "--json-out", help="Write the report as JSON here."),
    rate: float = typer.Option(25.0, help="Items per second (0: as fast as possible)."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for every item to settle."),
) -> None:
    """Run the whole pipeline on the local stack with sample traffic and report what happened."""
    from pipeline.demo import run_demo
    from pipeline.errors import StackError

    settings = _settings()
    _setup_logging("WARNING")
    try:
        report = asyncio.run(run_demo(items, json_out, rate, timeout, settings.state_dir, console))
    except StackError as exc:
        _fail(str(exc))
        return
    if not report["settled"] or report["duplicate_final_verdicts"] or report["journey_errors"]:
        raise typer.Exit(2)


@app.command()
def chaos(
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
    from pipeline.demo import run_chaos
    from pipeline.errors import StackError

    settings = _settings()
    _setup_logging("WARNING")
    try:
        report = asyncio.run(
            run_chaos(items, malformed, kill_worker, Role(role), json_out, rate, timeout, settings.state_dir, console,
                      workers_of_role=workers)
        )
    except StackError as exc:
        _fail(str(exc))
        return
    if report["lost"] or report["duplicate_final_verdicts"] or report["dead_letters"] != malformed:
        raise typer.Exit(2)


@bench_app.command("spine")
def bench_spine(
    items: int = typer.Option(1000, help="Items for the throughput burst (and texts for the embedder alone)."),
    rate: float = typer.Option(20.0, help="Steady-load rate, items per second."),
    seconds: float = typer.Option(30.0, help="Steady-load duration."),
    json_out: Optional[Path] = typer.Option(Path("out/bench-spine.json"), "--json-out"),
) -> None:
    """Triage items/s end to end vs the embedder alone, and verdict latency at a steady rate."""
    from pipeline.bench import run_spine_bench

    settings = _settings()
    _setup_logging("WARNING")
    asyncio.run(run_spine_bench(items, rate, seconds, json_out, settings.state_dir, console))


# -- inspection -------------------------------------------------------------------------------------------------


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration (secrets masked)."""
    console.print_json(json.dumps(_settings().masked()))


@topics_app.command("create")
def topics_create() -> None:
    """Create the pipeline's topics (idempotent)."""
    from pipeline.kafka_io import ensure_topics

    created = asyncio.run(ensure_topics(_settings().kafka))
    console.print("created: " + (", ".join(created) if created else "nothing (all exist)"))


@visibility_app.command("get")
def visibility_get(content_id: str) -> None:
    """Print an item's visibility state and its latest verdict."""
    from pipeline.store import Store

    async def run() -> None:
        store = Store(_settings().redis)
        try:
            record = await store.visibility(content_id)
        finally:
            await store.close()
        console.print(f"{content_id}: {record.state.value}{' (final)' if record.final else ''}")
        if record.verdict is not None:
            console.print_json(record.verdict.model_dump_json())

    asyncio.run(run())


# -- sub-command modules by area ------------------------------------------------------------------------------
# Each area keeps its commands in its own module and registers them here, one line each.
# (mount area modules below this line)
from pipeline.cli_deploy import deploy_app as _deploy_app  # noqa: E402 - mounted after the core commands
from pipeline.cli_policy import policy_app as _policy_app  # noqa: E402
from pipeline.cli_review import register_bench as _register_review_bench  # noqa: E402
from pipeline.cli_review import review_app as _review_app  # noqa: E402
from pipeline.cli_triage import register_bench as _register_triage_bench  # noqa: E402
from pipeline.cli_triage import triage_app as _triage_app  # noqa: E402
from pipeline.reasoner_bench import register_bench as _register_reasoner_bench  # noqa: E402

app.add_typer(_triage_app, name="triage")
app.add_typer(_policy_app, name="policy")
app.add_typer(_review_app, name="review")
app.add_typer(_deploy_app, name="deploy")
_register_triage_bench(bench_app)
_register_reasoner_bench(bench_app)
_register_review_bench(bench_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
