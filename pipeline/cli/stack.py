"""``modpipe stack up | down | status | restart``: the local stack (Tansu broker, Redis, Triton on CPU) by PID."""

from __future__ import annotations

import typer

from pipeline.cli.common import console, fail, settings

stack_app = typer.Typer(help="The local stack: Tansu broker, Redis, Triton (CPU).", no_args_is_help=True)


@stack_app.command("up")
def stack_up(
    ctx: typer.Context,
    no_triton: bool = typer.Option(False, "--no-triton", help="Start only the broker and Redis."),
    durable: bool = typer.Option(
        False, "--durable", help="Broker log on a local S3 server and a private Redis with an append-only file "
        "(survive kill -9; what the fault drills use). Default: memory storage."
    ),
    timeout: float = typer.Option(180.0, help="Seconds to wait for each service."),
) -> None:
    """Start the local stack on free loopback ports and record where it listens."""
    from pipeline import stack
    from pipeline.errors import StackError

    config = settings(ctx)
    try:
        info = stack.stack_up(config.state_dir, redis_url=config.redis.url, start_triton=not no_triton,
                              timeout_s=timeout, durable=durable)
    except StackError as exc:
        fail(str(exc))
    print_stack(info)


@stack_app.command("down")
def stack_down(ctx: typer.Context) -> None:
    """Stop what `stack up` started (by PID)."""
    from pipeline import stack

    stopped = stack.stack_down(settings(ctx).state_dir)
    console.print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))


@stack_app.command("restart")
def stack_restart(
    ctx: typer.Context,
    service: str = typer.Argument(..., help="kafka | redis | triton | s3"),
    hard: bool = typer.Option(False, "--hard", help="kill -9 instead of a graceful stop (a crash, for drills)."),
    timeout: float = typer.Option(180.0, help="Seconds to wait until it is ready again."),
) -> None:
    """Restart one service of the local stack on its own ports (running workers reconnect by themselves)."""
    from pipeline import stack
    from pipeline.errors import StackError

    try:
        svc = stack.service_restart(settings(ctx).state_dir, service, timeout_s=timeout, hard=hard)
    except StackError as exc:
        fail(str(exc))
    console.print(f"{service} restarted at {svc.address} (pid {svc.pid})")


@stack_app.command("status")
def stack_status(ctx: typer.Context) -> None:
    """Show where the local stack listens and whether each service is alive."""
    from pipeline import stack

    info = stack.stack_status(settings(ctx).state_dir)
    if info is None:
        console.print("the local stack is not running")
        raise typer.Exit(1)
    print_stack(info)


def print_stack(info) -> None:  # type: ignore[no-untyped-def]
    from pipeline import stack

    alive = stack.service_alive(info)
    for name, service in info.services.items():
        state = "[green]up[/]" if alive.get(name) else "[red]down[/]"
        pid = f"pid {service.pid}" if service.pid else "external"
        console.print(f"{name:8} {state} {service.address:28} {pid}")
    console.print(f"storage: {'durable (broker on S3, Redis append-only)' if info.durable else 'memory'}")
    console.print(f"env file: {info.state_dir / 'stack.env'}")
