"""``modpipe demo`` and ``modpipe chaos``: the whole pipeline on the local stack, with sample traffic.

Both start (or reuse) the local stack, start one worker per role as separate processes, publish items, wait until
every item has a final verdict, a review task or a dead letter, and report what happened. ``chaos`` adds malformed
messages and a kill -9 of a worker in mid-stream, and reports what was lost or duplicated (expected: nothing).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

from rich.console import Console
from rich.table import Table

from pipeline import stack as local_stack
from pipeline.app import Role
from pipeline.config import Settings, load_settings
from pipeline.harness.journey import JourneyObserver, summarise
from pipeline.harness.workers import Workers
from pipeline.reports import write_json
from pipeline.broker import Publisher, ensure_topics
from pipeline.harness.traffic import malformed_messages, sample_items

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    settings: Settings
    workers: Workers
    observer: JourneyObserver
    publisher: Publisher
    run_id: str


@asynccontextmanager
async def pipeline_running(
    state_dir: Path,
    console: Console,
    run_prefix: str,
    redis_key_prefix: str | None = None,
    extra_workers: dict[Role, int] | None = None,
) -> AsyncIterator[RunContext]:
    """Stack up (reused if already running), workers up and ready, an observer on the output topics.

    ``redis_key_prefix`` gives the workers a private keyspace (cold caches), for benchmarks. ``extra_workers``
    starts more than one worker for a role (they share its consumer group and split its partitions).
    """
    started_stack = False
    info = local_stack.stack_status(state_dir)
    if info is None:
        console.print("[bold]starting the local stack[/] (Tansu broker, Redis, Triton with the CPU stand-in reasoner)")
        t0 = time.monotonic()
        info = local_stack.stack_up(state_dir)
        started_stack = True
        console.print(f"  stack up in {time.monotonic() - t0:.1f}s: kafka {info.kafka_bootstrap}, "
                      f"redis {info.redis_url}, triton {info.triton_grpc}")
    settings = load_settings()
    await ensure_topics(settings.kafka)
    worker_env = {**info.env(), "MODPIPE_STATE_DIR": str(state_dir)}
    if redis_key_prefix is not None:
        worker_env["MODPIPE_REDIS__KEY_PREFIX"] = redis_key_prefix
    workers = Workers(settings, worker_env, state_dir / "logs")
    publisher = Publisher(settings.kafka)
    observer = JourneyObserver(settings, f"{run_prefix}-{uuid.uuid4().hex[:8]}")
    try:
        console.print("[bold]starting workers[/]: " + ", ".join(r.value for r in Role))
        t0 = time.monotonic()
        workers.start_all()
        for role, count in (extra_workers or {}).items():
            for _ in range(count):
                workers.start(role)
        await asyncio.get_running_loop().run_in_executor(None, workers.wait_ready)
        console.print(f"  workers ready in {time.monotonic() - t0:.1f}s (logs in {state_dir / 'logs'})")
        await publisher.start()
        await observer.start()
        yield RunContext(settings, workers, observer, publisher, observer.run_id)
    finally:
        await observer.stop()
        await publisher.stop()
        workers.stop_all()
        if started_stack:
            local_stack.stack_down(state_dir)
            console.print("stopped the local stack")


async def publish_items(ctx: RunContext, items: list, rate_per_s: float) -> None:
    """Publish items to content.incoming, paced at ``rate_per_s`` (0: as fast as the broker acknowledges)."""
    topic = ctx.settings.kafka.topic(ctx.settings.kafka.incoming_topic)
    interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    start = time.monotonic()
    for i, item in enumerate(items):
        if interval:
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await ctx.publisher.send(topic, item.content_id, item.to_bytes())


def print_report(console: Console, report: dict, title: str) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in ("published", "final_verdicts", "pending_review", "dead_letters", "lost", "duplicate_final_verdicts",
                "escalation_rate"):
        if key in report:
            table.add_row(key, str(report[key]))
    for route, count in report["routes"].items():  # type: ignore[union-attr]
        table.add_row(f"route {route}", str(count))
    for name, value in report["latency_ms"].items():  # type: ignore[union-attr]
        table.add_row(f"latency {name} (ms)", "-" if value is None else f"{value:.1f}")
    console.print(table)
    for reason in report.get("dead_letter_reasons", []):  # type: ignore[union-attr]
        console.print(f"  dead letter: {reason}")
    for error in report.get("journey_errors", []):  # type: ignore[union-attr]
        console.print(f"  [red]journey error[/]: {error}")


async def run_demo(items: int, json_out: Path | None, rate_per_s: float, timeout_s: float, state_dir: Path,
                   console: Console) -> dict:
    async with pipeline_running(state_dir, console, "demo") as ctx:
        batch = sample_items(items, ctx.run_id)
        console.print(f"[bold]publishing {items} items[/] of the project's sample traffic at {rate_per_s:g}/s")
        t0 = time.monotonic()
        await publish_items(ctx, batch, rate_per_s)
        ids = [i.content_id for i in batch]
        settled = await ctx.observer.wait_settled(ids, 0, timeout_s)
        report = summarise(ctx.observer, ids, len(batch))
        report.update(run_id=ctx.run_id, settled=settled, wall_s=round(time.monotonic() - t0, 1))
    print_report(console, report, f"modpipe demo ({report['run_id']})")
    write_json(json_out, report)
    return report


async def run_chaos(items: int, malformed: int, kill_worker: bool, kill_role: Role, json_out: Path | None,
                    rate_per_s: float, timeout_s: float, state_dir: Path, console: Console,
                    workers_of_role: int = 1) -> dict:
    """``workers_of_role`` > 1 runs that many workers of ``kill_role`` in one group, so the kill and the restart
    each force a rebalance while messages are in flight."""
    # A private Redis keyspace: cold caches, so the kill lands while real work is in flight.
    keyspace = f"modpipe-chaos-{uuid.uuid4().hex[:8]}:"
    extra = {kill_role: workers_of_role - 1} if workers_of_role > 1 else None
    async with pipeline_running(state_dir, console, "chaos", redis_key_prefix=keyspace, extra_workers=extra) as ctx:
        batch = sample_items(items, ctx.run_id, seed=1)
        bad = list(malformed_messages(malformed, ctx.run_id, ctx.settings.triage.max_text_chars))
        topic = ctx.settings.kafka.topic(ctx.settings.kafka.incoming_topic)
        ids = [i.content_id for i in batch]
        t0 = time.monotonic()
        publishing = asyncio.create_task(publish_items(ctx, batch, rate_per_s))
        for _, key, value in bad:
            await ctx.publisher.send(topic, key, value)
        killed_at = None
        if kill_worker:
            # Kill once a third of the items are through, so the crash lands mid-stream with work in flight.
            while sum(ctx.observer.journeys[c].settled for c in ids) < max(1, items // 3):
                await asyncio.sleep(0.05)
            ctx.workers.kill(kill_role)
            killed_at = round(time.monotonic() - t0, 2)
            console.print(f"[red]kill -9[/] {kill_role.value} worker at {killed_at}s; restarting it")
            ctx.workers.start(kill_role)
        await publishing
        settled = await ctx.observer.wait_settled(ids, malformed, timeout_s)
        report = summarise(ctx.observer, ids, len(batch))
        report.update(
            run_id=ctx.run_id,
            settled=settled,
            malformed_published=malformed,
            killed_role=kill_role.value if kill_worker else None,
            workers_of_killed_role=workers_of_role,
            killed_at_s=killed_at,
            dead_letters_without_reason=sum(1 for d in ctx.observer.dead_letters.values() if not d.error.strip()),
            dead_letter_copies=ctx.observer.dead_letter_copies,
            wall_s=round(time.monotonic() - t0, 1),
        )
    print_report(console, report, f"modpipe chaos ({report['run_id']})")
    write_json(json_out, report)
    return report


