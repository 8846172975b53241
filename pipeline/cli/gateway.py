"""``modpipe gateway serve`` and ``modpipe webhooks deliver | list | add | remove | replay``: the HTTP front doors.

``gateway serve`` and ``webhooks deliver`` are roles of the image (compose services, Helm Deployments, each
scaled on its own). The other ``webhooks`` commands are operator commands that talk to Redis directly: registering
a callback URL is an operator action, never an API.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Optional

import typer

from pipeline.cli.common import console, fail, settings, setup_logging

gateway_app = typer.Typer(help="The HTTP gateway: ingest, synchronous checks, OpenAI's moderation API.",
                          no_args_is_help=True)
webhooks_app = typer.Typer(help="Webhooks: final verdicts POSTed to each platform, signed, in order.",
                           no_args_is_help=True)


@gateway_app.command("serve")
def gateway_serve(
    ctx: typer.Context,
    host: Optional[str] = typer.Option(None, help="Address to bind (default MODPIPE_GATEWAY__HOST)."),
    port: Optional[int] = typer.Option(None, help="Port (default MODPIPE_GATEWAY__PORT)."),
) -> None:
    """Run the gateway in the foreground (OpenAPI document at /openapi.json)."""
    from pipeline.gateway.api import serve

    config = settings(ctx)
    setup_logging(config.worker.log_level)
    serve(config, host or config.gateway.host, port if port is not None else config.gateway.port,
          config.worker.log_level)


def _registry(config):  # type: ignore[no-untyped-def]
    from pipeline.store.redis import RedisStore
    from pipeline.webhooks.registry import WebhookRegistry

    store = RedisStore(config.redis)
    return store, WebhookRegistry(store, config.redis.verdict_ttl_s)


def _key(config) -> str:  # type: ignore[no-untyped-def]
    from pipeline.webhooks.deliverer import signing_key
    from pipeline.webhooks.registry import SigningKeyMissing

    try:
        return signing_key(config)
    except SigningKeyMissing as exc:
        fail(str(exc))


@webhooks_app.command("deliver")
def webhooks_deliver(ctx: typer.Context) -> None:
    """Run the deliverer in the foreground: final verdicts from moderation.verdicts to each platform's webhook."""
    from pipeline.webhooks.deliverer import Deliverer, run_until_signalled

    config = settings(ctx)
    setup_logging(config.worker.log_level)
    _key(config)
    asyncio.run(run_until_signalled(Deliverer(config)))


@webhooks_app.command("add")
def webhooks_add(
    ctx: typer.Context,
    platform: str = typer.Argument(..., help="The platform (as its platform token names it)."),
    url: str = typer.Argument(..., help="Callback URL (https:// in production)."),
) -> None:
    """Register (or replace) a platform's callback URL; prints its signing secret once."""
    from pipeline.webhooks.registry import InvalidWebhook

    config = settings(ctx)
    key = _key(config)

    async def run():  # type: ignore[no-untyped-def]
        store, registry = _registry(config)
        try:
            return await registry.add(platform, url)
        finally:
            await store.close()

    try:
        hook = asyncio.run(run())
    except InvalidWebhook as exc:
        fail(f"{exc.field}: {exc}")
    if not url.startswith("https://"):
        console.print("[yellow]warning:[/] the URL is not https: deliveries (verdicts with evidence) travel in clear")
    console.print(f"registered {platform} -> {url} (registration {hook.registration_id}); verdicts decided from now on "
                  "are delivered")
    console.print(f"signing secret (shown once; verify X-Modpipe-Signature with it): {hook.secret(key)}")


@webhooks_app.command("remove")
def webhooks_remove(ctx: typer.Context, platform: str = typer.Argument(...)) -> None:
    """Stop delivering to a platform (its dead letters stay until they expire or are replayed)."""
    config = settings(ctx)

    async def run() -> bool:
        store, registry = _registry(config)
        try:
            return await registry.remove(platform)
        finally:
            await store.close()

    if not asyncio.run(run()):
        fail(f"no webhook registered for {platform!r}")
    console.print(f"removed the webhook of {platform} (running deliverers stop within a few seconds)")


@webhooks_app.command("list")
def webhooks_list(ctx: typer.Context) -> None:
    """Registered webhooks with their dead letters and parked content ids."""
    config = settings(ctx)

    async def run():  # type: ignore[no-untyped-def]
        store, registry = _registry(config)
        try:
            hooks = await registry.all()
            return [(h, await registry.counts(p)) for p, h in sorted(hooks.items())]
        finally:
            await store.close()

    rows = asyncio.run(run())
    if not rows:
        console.print("no webhooks registered")
    for hook, counts in rows:
        when = datetime.fromtimestamp(hook.created_at, timezone.utc).isoformat(timespec="seconds")
        console.print(f"{hook.platform}  {hook.url}  registered {when}  dead letters {counts['dead_letters']}  "
                      f"parked ids {counts['parked_ids']}", soft_wrap=True)


@webhooks_app.command("replay")
def webhooks_replay(
    ctx: typer.Context,
    platform: str = typer.Argument(...),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="Send at most this many."),
) -> None:
    """Send a platform's dead letters in order (one attempt each; stops at the first failure, keeping order)."""
    from pipeline.webhooks.deliverer import replay
    from pipeline.webhooks.sender import Sender

    config = settings(ctx)
    key = _key(config)

    async def run():  # type: ignore[no-untyped-def]
        store, registry = _registry(config)
        sender = Sender(config.webhooks)
        try:
            return await replay(registry, sender, key, platform, limit)
        finally:
            await sender.close()
            await store.close()

    try:
        outcome = asyncio.run(run())
    except LookupError as exc:
        fail(str(exc))
    console.print(f"{platform}: delivered {outcome['delivered']}, {outcome['remaining']} still dead-lettered")
    if outcome["error"]:
        fail(f"stopped at a delivery that failed again: {outcome['error']}", code=2)
