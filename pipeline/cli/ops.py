"""``modpipe status | config | topics | visibility``: inspecting a deployment."""

from __future__ import annotations

import asyncio
import json

import typer

from pipeline.cli.common import console, settings

config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
visibility_app = typer.Typer(help="The visibility store.", no_args_is_help=True)


@config_app.command("show")
def config_show(
    ctx: typer.Context,
    markdown: bool = typer.Option(False, "--markdown", help="Every setting's variable, default and meaning instead "
                                  "(the README's table)."),
) -> None:
    """Print the effective configuration (secrets masked)."""
    if markdown:
        from pipeline.config import settings_table

        print(settings_table())
        return
    console.print_json(json.dumps(settings(ctx).masked()))


@topics_app.command("create")
def topics_create(ctx: typer.Context) -> None:
    """Create the pipeline's topics (idempotent)."""
    from pipeline.broker import ensure_topics

    created = asyncio.run(ensure_topics(settings(ctx).kafka))
    console.print("created: " + (", ".join(created) if created else "nothing (all exist)"))


@visibility_app.command("get")
def visibility_get(ctx: typer.Context, content_id: str) -> None:
    """Print an item's visibility state and its latest verdict."""
    from pipeline.store import RedisStore

    async def run() -> None:
        store = RedisStore(settings(ctx).redis)
        try:
            record = await store.visibility(content_id)
        finally:
            await store.close()
        console.print(f"{content_id}: {record.state.value}{' (final)' if record.final else ''}")
        if record.verdict is not None:
            console.print_json(record.verdict.model_dump_json())

    asyncio.run(run())


def status(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print the status as JSON."),
) -> None:
    """One line per role: consumer lag (and partitions past the log end), backlog, workers ready.

    Lag is what each role's consumer group has not yet committed on its input topic, read from the broker (no
    worker needed). The reasoning line says BACKLOG when its lag is above limits.reasoning_backlog: triage keeps
    deciding what it can; scale the reasoning role (docs/OPERATIONS.md).
    """
    from pipeline.app import Role, group_id, role_topic
    from pipeline.broker import group_lag
    from pipeline.errors import RetryableError
    from pipeline.store import RedisStore
    from pipeline.store.attempts import read_lag

    config = settings(ctx)

    async def gather() -> list[dict]:
        rows = []
        store = RedisStore(config.redis)
        try:
            for role in Role:
                row: dict = {"role": role.value, "topic": role_topic(config, role)}
                try:
                    lags = await group_lag(config.kafka, group_id(config, role), row["topic"])
                    row.update(lag=sum(x.lag for x in lags), partitions=len(lags),
                               beyond_end=[x.partition for x in lags if x.beyond_end])
                except RetryableError as exc:
                    row.update(lag=None, error=str(exc))
                bound = config.limits.reasoning_backlog if role is Role.REASONING else None
                row["bound"] = bound
                row["backlog"] = bool(bound is not None and row.get("lag") is not None and row["lag"] > bound)
                try:
                    report = await read_lag(store, role.value)
                    row["reported_by_workers"] = report is not None
                except RetryableError:
                    row["reported_by_workers"] = None
                row["workers_ready"] = _ready_workers(config.state_dir, role.value)
                rows.append(row)
        finally:
            await store.close()
        return rows

    rows = asyncio.run(gather())
    if json_out:
        console.print_json(json.dumps(rows))
        return
    for row in rows:
        if row["lag"] is None:
            console.print(f"{row['role']:14} [red]broker unavailable[/]: {row['error']}")
            continue
        line = f"{row['role']:14} lag {row['lag']:>7} on {row['partitions']} partitions"
        if row["bound"] is not None:
            line += f" (bound {row['bound']})" + (" [red]BACKLOG[/]" if row["backlog"] else "")
        if row["beyond_end"]:
            line += f" [yellow]committed past the log end on partitions {row['beyond_end']}[/]"
        line += f", workers ready here: {row['workers_ready']}"
        console.print(line)


def _ready_workers(state_dir, role: str) -> int:  # type: ignore[no-untyped-def]
    """Workers of ``role`` on this machine whose ready file names a live process."""
    import os

    count = 0
    for path in (state_dir / "workers").glob(f"{role}-*.ready"):
        try:
            os.kill(int(path.stem.rsplit("-", 1)[1]), 0)
            count += 1
        except (ValueError, ProcessLookupError, PermissionError):
            continue
    return count
