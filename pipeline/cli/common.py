"""What every ``modpipe`` command group shares: consoles, logging set-up, failing with a message, the settings."""

from __future__ import annotations

import logging
from typing import NoReturn

import typer
from rich.console import Console

from pipeline.config import Settings, load_settings

console = Console()
err_console = Console(stderr=True)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {message}")
    raise typer.Exit(code)


def settings(ctx: typer.Context) -> Settings:
    """The invocation's one :class:`Settings`, built on first use and kept on the root context.

    Built lazily so that ``--help`` works whatever the environment says; an invalid variable fails the command
    with pydantic's message, which names it.
    """
    root = ctx.find_root()
    if not isinstance(root.obj, Settings):
        try:
            root.obj = load_settings()
        except Exception as exc:  # noqa: BLE001 - pydantic's message says which variable is wrong
            fail(f"invalid configuration: {exc}")
    return root.obj
