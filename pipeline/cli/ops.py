"""``modpipe config | topics | visibility``: inspecting a deployment."""

from __future__ import annotations

import asyncio
import json

import typer

from pipeline.cli.common import console, settings

config_app = typer.Typer(help="Configuration.", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
visibility_app = typer.Typer(help="The visibility store.", no_args_is_help=True)


@config_app.command("show")
def config_show(ctx: typer.Context) -> None:
    """Print the effective configuration (secrets masked)."""
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
