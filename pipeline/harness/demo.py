"""``modpipe demo`` and ``modpipe chaos``: the whole pipeline on the local stack, with sample traffic.

Both start (or reuse) the local stack, start one worker per role as separate, supervised processes, publish items,
wait until every item has a final verdict, a review task or a dead letter, and report what happened.

``chaos`` is the fault drill: malformed and hostile messages (``poison``) among valid ones, and a kill -9 in
mid-stream of a worker or of a dependency (``redis``, ``broker``, ``triton``: killed, kept down for ``down_s``,
restarted on its own ports). Its report says what was published and acknowledged by the broker, final verdicts,
review tasks, dead letters by reason, lost items, duplicate final verdicts, items released while unreviewed (an
item without a final verdict that a platform may show: must be 0), valid items dead-lettered (must be 0) and how
long the pipeline took to recover. When it starts the stack itself it starts the durable one.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Sequence

from rich.console import Console
from rich.table import Table

from aiokafka import AIOKafkaProducer

from pipeline import stack as local_stack
from pipeline.app import Role
from pipeline.broker import Publisher, ensure_topics
from pipeline.config import Settings, stack_env_file
from pipeline.errors import StackError, StoreUnavailable
from pipeline.harness.journey import JourneyObserver, stage_latencies, summarise
from pipeline.harness.load import load_average
from pipeline.harness.poison import poison_messages
from pipeline.harness.traffic import malformed_messages, sample_items
from pipeline.harness.workers import Workers
from pipeline.reports import write_json
from pipeline.store import RedisStore, Visibility

logger = logging.getLogger(__name__)


@dataclass
class RunContext:
    settings: Settings
    workers: Workers
    observer: JourneyObserver
    publisher: Publisher
    run_id: str
    keyspace: dict[str, str] = field(default_factory=dict)  # the run's topic and Redis key prefixes, for reports


@asynccontextmanager
async def pipeline_running(
    state_dir: Path,
    console: Console,
    run_prefix: str,
    redis_key_prefix: str | None = None,
    extra_workers: dict[Role, int] | None = None,
    durable: bool = False,
    worker_env: dict[str, str] | None = None,
    *,
    fresh_keyspace: bool = False,
    roles: Sequence[Role] | None = None,
) -> AsyncIterator[RunContext]:
    """Stack up (reused if already running), workers up and ready, an observer on the output topics.

    ``fresh_keyspace`` runs in a keyspace of this run only: topics, consumer groups and Redis keys under a new
    prefix (``<prefix><run_prefix>-<hex>.`` for topics, ``<key_prefix><run_prefix>-<hex>:`` for Redis), so no
    cache, ledger entry or committed offset of an earlier run is seen: what the demo and every benchmark use, so
    their numbers are first-run numbers. ``redis_key_prefix`` gives the workers that Redis prefix instead (a
    benchmark that measures a warm cache shares it between runs). ``extra_workers`` starts more than one worker
    for a role (they share its consumer group and split its partitions). ``durable`` starts the durable stack when
    none runs. ``worker_env`` adds settings for the workers only. ``roles`` starts only those roles (a stage
    measured alone).
    """
    started_stack = False
    info = local_stack.stack_status(state_dir)
    if info is None:
        console.print("[bold]starting the local stack[/] (Tansu broker, Redis, Triton with the CPU stand-in reasoner)"
                      + (", durable storage" if durable else ""))
        t0 = time.monotonic()
        info = local_stack.stack_up(state_dir, durable=durable)
        started_stack = True
        console.print(f"  stack up in {time.monotonic() - t0:.1f}s: kafka {info.kafka_bootstrap}, "
                      f"redis {info.redis_url}, triton {info.triton_grpc}")
    # The stack in state_dir, whatever MODPIPE_STATE_DIR says (an explicit environment still wins over stack.env).
    settings = Settings(_env_file=stack_env_file(state_dir)).model_copy(update={"state_dir": Path(state_dir)})
    run_hex = uuid.uuid4().hex[:8]
    if fresh_keyspace:
        topic_prefix = f"{settings.kafka.topic_prefix}{run_prefix}-{run_hex}."
        settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"topic_prefix": topic_prefix})})
        if redis_key_prefix is None:
            redis_key_prefix = f"{settings.redis.key_prefix}{run_prefix}-{run_hex}:"
    if redis_key_prefix is not None:
        redis = settings.redis.model_copy(update={"key_prefix": redis_key_prefix})
        settings = settings.model_copy(update={"redis": redis})
    await ensure_topics(settings.kafka)
    env = {**info.env(), "MODPIPE_STATE_DIR": str(state_dir), **(worker_env or {})}
    if fresh_keyspace:
        env["MODPIPE_KAFKA__TOPIC_PREFIX"] = settings.kafka.topic_prefix
    if redis_key_prefix is not None:
        env["MODPIPE_REDIS__KEY_PREFIX"] = redis_key_prefix
    workers = Workers(settings, env, state_dir / "logs")
    publisher = Publisher(settings.kafka)
    observer = JourneyObserver(settings, f"{run_prefix}-{run_hex}")
    started = list(roles) if roles is not None else list(Role)
    try:
        console.print("[bold]starting workers[/]: " + ", ".join(r.value for r in started))
        t0 = time.monotonic()
        workers.start_all(started)
        for role, count in (extra_workers or {}).items():
            for _ in range(count):
                workers.start(role)
        await asyncio.get_running_loop().run_in_executor(None, workers.wait_ready)
        console.print(f"  workers ready in {time.monotonic() - t0:.1f}s (logs in {state_dir / 'logs'})")
        await publisher.start()
        await observer.start()
        yield RunContext(settings, workers, observer, publisher, observer.run_id,
                         {"topic_prefix": settings.kafka.topic_prefix, "redis_key_prefix": settings.redis.key_prefix})
    finally:
        await observer.stop()
        await publisher.stop()
        workers.stop_all()
        if started_stack:
            local_stack.stack_down(state_dir)
            console.print("stopped the local stack")


async def publish_items(ctx: RunContext, items: list, rate_per_s: float, topic: str | None = None) -> list[float]:
    """Publish items (anything with ``content_id`` and ``to_bytes()``) to ``topic`` (content.incoming unless
    given), paced at ``rate_per_s`` (0: as fast as the broker acknowledges); returns each item's send time
    (``time.time()``).

    Items that are due are sent together (one produce call, every acknowledgement awaited), so the offered rate
    holds even when one acknowledgement takes longer than the interval between two items.
    """
    topic = topic or ctx.settings.kafka.topic(ctx.settings.kafka.incoming_topic)
    sent_at: list[float] = []
    if rate_per_s <= 0:
        for i in range(0, len(items), 500):
            chunk = items[i : i + 500]
            now = time.time()
            await ctx.publisher.send_many([(topic, item.content_id, item.to_bytes()) for item in chunk])
            sent_at.extend([now] * len(chunk))
        return sent_at
    interval = 1.0 / rate_per_s
    start = time.monotonic()
    i = 0
    while i < len(items):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        due = min(len(items), max(i + 1, int((time.monotonic() - start) / interval) + 1))
        now = time.time()
        await ctx.publisher.send_many([(topic, item.content_id, item.to_bytes()) for item in items[i:due]])
        sent_at.extend([now] * (due - i))
        i = due
    return sent_at


def print_report(console: Console, report: dict, title: str) -> None:
    table = Table(title=title, show_header=True)
    table.add_column("what")
    table.add_column("value", justify="right")
    run = report.get("run")
    if run:
        table.add_row("run", f"{run['items']} items at {run['rate_per_s']:g}/s, caches {run['caches'].split(':')[0]}")
        table.add_row("load average before / after", f"{run['load_average_before']} / {run['load_average_after']}")
    for key in ("published", "final_verdicts", "pending_review", "dead_letters", "lost", "duplicate_final_verdicts",
                "escalation_rate"):
        if key in report:
            table.add_row(key, str(report[key]))
    for route, count in report["routes"].items():  # type: ignore[union-attr]
        table.add_row(f"route {route}", str(count))
    for name, value in report["latency_ms"].items():  # type: ignore[union-attr]
        table.add_row(f"latency {name} (ms)", "-" if value is None else f"{value:.1f}")
    per = report.get("per_1000_items")
    if per:
        table.add_row("per 1,000 items: escalated / sent to review", f"{per['escalated']} / {per['sent_to_review']}")
        table.add_row("per 1,000 items: reasoner calls / input / output tokens",
                      f"{per['reasoner_calls']} / {per['input_tokens']:,} / {per['output_tokens']:,}")
    console.print(table)
    for reason in report.get("dead_letter_reasons", []):  # type: ignore[union-attr]
        console.print(f"  dead letter: {reason}")
    for error in report.get("journey_errors", []):  # type: ignore[union-attr]
        console.print(f"  [red]journey error[/]: {error}")


async def run_demo(items: int, json_out: Path | None, rate_per_s: float, timeout_s: float, state_dir: Path,
                   console: Console, warm: bool = False) -> dict:
    """Publish ``items`` of the sample traffic at ``rate_per_s`` through every role and report what happened.

    The run has a keyspace of its own (fresh topics and Redis keys), so the reasoner's verdict cache starts cold:
    the numbers are what a fresh clone sees. ``warm`` keeps the fresh topics but shares one Redis keyspace with
    every other ``--warm`` run (``<key_prefix>demo-warm:``), so a second warm run measures the verdict cache.
    """
    base = Settings(_env_file=stack_env_file(state_dir)).redis.key_prefix
    shared = f"{base}demo-warm:" if warm else None
    load_before = load_average()
    async with pipeline_running(state_dir, console, "demo", redis_key_prefix=shared, fresh_keyspace=True) as ctx:
        batch = sample_items(items, ctx.run_id, distinct=True)  # past the pool's size, replies: no repeated text
        caches = ("warm: Redis keyspace shared with earlier --warm runs (their verdicts are cached)" if warm else
                  "cold: fresh topics and Redis keys of this run only")
        console.print(f"[bold]publishing {items} items[/] of the project's sample traffic at {rate_per_s:g}/s "
                      f"(caches {caches.split(':')[0]})")
        t0 = time.monotonic()
        await publish_items(ctx, batch, rate_per_s)
        ids = [i.content_id for i in batch]
        settled = await ctx.observer.wait_settled(ids, 0, timeout_s)
        report = summarise(ctx.observer, ids, len(batch))
        report.update(run_id=ctx.run_id, settled=settled, wall_s=round(time.monotonic() - t0, 1),
                      run={"items": items, "rate_per_s": rate_per_s, "caches": caches, **ctx.keyspace,
                           "load_average_before": load_before, "load_average_after": load_average()},
                      stage_latency_ms=stage_latencies(ctx.observer, ids))
    print_report(console, report, f"modpipe demo ({report['run_id']})")
    write_json(json_out, report)
    return report


KILLABLE = ("worker", "redis", "broker", "triton")
_SERVICE = {"redis": local_stack.REDIS, "broker": local_stack.KAFKA, "triton": local_stack.TRITON}


@dataclass
class Acked:
    """What the drill's producer sent and what the broker acknowledged (a send retried until acknowledged)."""

    published: int = 0
    acknowledged: set[str] = field(default_factory=set)
    send_failures: int = 0


async def _send_until_acked(ctx: RunContext, topic: str, key: bytes | str | None, value: bytes, acked: Acked,
                            cid: str, deadline: float, producer: AIOKafkaProducer | None = None,
                            headers: list[tuple[str, bytes]] | None = None) -> None:
    """What a careful producer does: retry a send the broker did not acknowledge (a duplicate is harmless: the
    pipeline treats the same id and text as the same revision)."""
    acked.published += 1
    while time.monotonic() < deadline:
        try:
            if producer is not None:
                await producer.send_and_wait(topic, value=value, key=key if isinstance(key, bytes) else
                                             (key.encode() if key else None), headers=headers)
            else:
                await ctx.publisher.send(topic, key, value)
            acked.acknowledged.add(cid)
            return
        except Exception:  # noqa: BLE001 - broker down: retry like a real producer would
            acked.send_failures += 1
            await asyncio.sleep(0.5)


async def _publish_acked(ctx: RunContext, items: list, rate_per_s: float, acked: Acked, deadline: float) -> None:
    topic = ctx.settings.kafka.topic(ctx.settings.kafka.incoming_topic)
    interval = 1.0 / rate_per_s if rate_per_s > 0 else 0.0
    start = time.monotonic()
    for i, item in enumerate(items):
        if interval:
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await _send_until_acked(ctx, topic, item.content_id, item.to_bytes(), acked, item.content_id, deadline)


async def _released_while_unreviewed(settings: Settings, keyspace: str, observer: JourneyObserver,
                                     ids: list[str]) -> list[str]:
    """Items with no final verdict that the visibility store would let a platform show (must be none)."""
    store = RedisStore(settings.redis.model_copy(update={"key_prefix": keyspace}))
    released = []
    try:
        for cid in ids:
            journey = observer.journeys.get(cid)
            if journey is None or journey.finals or not journey.verdicts:
                continue
            for _ in range(20):
                try:
                    state = (await store.visibility(cid)).state
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.5)
            else:
                continue
            if state is not Visibility.HIDDEN_PENDING:
                released.append(cid)
    finally:
        await store.close()
    return released


async def run_chaos(
    items: int,
    malformed: int,
    kill_worker: bool,
    kill_role: Role,
    json_out: Path | None,
    rate_per_s: float,
    timeout_s: float,
    state_dir: Path,
    console: Console,
    workers_of_role: int = 1,
    kill: str | None = None,
    poison: bool = False,
    durable: bool = True,
    down_s: float = 10.0,
) -> dict:
    """One drill. ``kill`` is worker, redis, broker or triton (``kill_worker`` is the older spelling of
    ``kill="worker"``); ``workers_of_role`` > 1 runs that many workers of ``kill_role`` in one group, so the kill
    and the restart each force a rebalance while messages are in flight. ``poison`` adds every hostile message of
    :mod:`pipeline.harness.poison`."""
    kill = kill or ("worker" if kill_worker else None)
    if kill is not None and kill not in KILLABLE:
        raise StackError(f"unknown drill {kill!r}; choose one of {', '.join(KILLABLE)}")
    # A private Redis keyspace: cold caches, so the kill lands while real work is in flight.
    keyspace = f"modpipe-chaos-{uuid.uuid4().hex[:8]}:"
    extra = {kill_role: workers_of_role - 1} if workers_of_role > 1 else None
    async with pipeline_running(state_dir, console, "chaos", redis_key_prefix=keyspace, extra_workers=extra,
                                durable=durable) as ctx:
        info = local_stack.stack_status(state_dir)
        if kill in _SERVICE and (info is None or info.services.get(_SERVICE[kill]) is None
                                 or info.services[_SERVICE[kill]].pid is None):
            raise StackError(f"the drill kills {kill}, but the running stack's {kill} is not its own; run "
                             "`modpipe stack down` and let chaos start a durable stack")
        batch = sample_items(items, ctx.run_id, seed=1)
        bad = list(malformed_messages(malformed, ctx.run_id, ctx.settings.triage.max_text_chars))
        hostile = list(poison_messages(ctx.run_id)) if poison else []
        topic = ctx.settings.kafka.topic(ctx.settings.kafka.incoming_topic)
        valid_ids = [i.content_id for i in batch] + [p.content_id for p in hostile if p.expected_error is None]
        expected_letters = malformed + sum(1 for p in hostile if p.expected_error is not None)
        acked = Acked()
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        publishing = asyncio.create_task(_publish_acked(ctx, batch, rate_per_s, acked, deadline))
        # Poison and malformed messages go in early, among the valid ones, on a producer that allows big values.
        big = AIOKafkaProducer(bootstrap_servers=ctx.settings.kafka.bootstrap_servers, acks="all",
                               max_request_size=16 * 1024 * 1024)
        await big.start()
        try:
            for _, key, value in bad:
                await _send_until_acked(ctx, topic, key, value, acked, key.decode(), deadline, big)
            for message in hostile:
                await _send_until_acked(ctx, topic, message.key, message.value, acked, message.content_id, deadline,
                                        big, headers=message.headers or None)
        finally:
            await big.stop()
        killed_at = restarted_at = None
        killed_pid = None
        if kill is not None:
            # Kill once a third of the items are through, so the crash lands mid-stream with work in flight.
            while sum(ctx.observer.journeys[c].settled for c in valid_ids) < max(1, items // 3):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            killed_at = time.monotonic()
            if kill == "worker":
                killed_pid = ctx.workers.kill(kill_role)
                console.print(f"[red]kill -9[/] {kill_role.value} worker {killed_pid} at {killed_at - t0:.1f}s; "
                              "the supervisor restarts it")
                restarted_at = killed_at
            else:
                service = _SERVICE[kill]
                local_stack.service_kill(state_dir, service)
                console.print(f"[red]kill -9[/] {kill} at {killed_at - t0:.1f}s; restarting it in {down_s:g}s")
                await asyncio.sleep(down_s)
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: local_stack.service_start(state_dir, service, timeout_s=180))
                restarted_at = time.monotonic()
                console.print(f"  {kill} back on its ports at {restarted_at - t0:.1f}s")
        await publishing
        if restarted_at is not None:
            # Traffic after the restart too, so that recovery is measured on work that needs the restarted thing.
            after = sample_items(max(30, items // 10), f"{ctx.run_id}-after", seed=2)
            valid_ids += [i.content_id for i in after]
            # Triton: spread it past the reasoner's circuit-breaker reset, which lets the first call through.
            span = ctx.settings.reasoner.breaker_reset_s + 10 if kill == "triton" else 0.0
            await _publish_acked(ctx, after, min(rate_per_s, len(after) / span) if span else rate_per_s, acked,
                                 deadline)
        acknowledged_ids = [c for c in valid_ids if c in acked.acknowledged]
        settled = await ctx.observer.wait_settled(acknowledged_ids, expected_letters,
                                                  max(1.0, deadline - time.monotonic()))
        report = summarise(ctx.observer, acknowledged_ids, len(acknowledged_ids))
        letters = list(ctx.observer.dead_letters.values())
        by_reason: dict[str, int] = {}
        for letter in letters:
            by_reason[letter.error_type] = by_reason.get(letter.error_type, 0) + 1
        valid_set = set(valid_ids)
        recovery = None
        if restarted_at is not None:
            after = [t for t, _, what in ctx.observer.arrivals if t >= restarted_at
                     and (kill != "triton" or what == "final_reasoner")]
            recovery = round(min(after) - restarted_at, 2) if after else None
        released = await _released_while_unreviewed(ctx.settings, keyspace, ctx.observer, acknowledged_ids)
        report.update(
            run_id=ctx.run_id,
            settled=settled,
            drill=kill or "none",
            durable_stack=bool(info and info.durable),
            published=acked.published,
            acknowledged=len(acked.acknowledged),
            not_acknowledged=acked.published - len(acked.acknowledged),
            producer_send_retries=acked.send_failures,
            review_tasks=report["pending_review"],
            malformed_published=malformed,
            poison_published=len(hostile),
            dead_letters_expected=expected_letters,
            dead_letters_by_reason=dict(sorted(by_reason.items())),
            valid_dead_lettered=sorted(d.content_id for d in letters if d.content_id in valid_set),
            released_while_unreviewed=len(released),
            released_ids=released[:20],
            killed_role=kill_role.value if kill == "worker" else None,
            workers_of_killed_role=workers_of_role,
            killed_at_s=round(killed_at - t0, 2) if killed_at else None,
            down_s=round(restarted_at - killed_at, 2) if killed_at and restarted_at else None,
            time_to_recover_s=recovery,
            worker_restarts=dict(ctx.workers.restarts),
            worker_exit_codes=ctx.workers.exit_codes,
            dead_letters_without_reason=sum(1 for d in letters if not d.error.strip()),
            dead_letter_copies=ctx.observer.dead_letter_copies,
            wall_s=round(time.monotonic() - t0, 1),
        )
    print_chaos_report(console, report)
    write_json(json_out, report)
    return report


def chaos_passed(report: dict) -> bool:
    """The drill's targets: nothing lost, no duplicate, nothing released unreviewed, no valid item dead-lettered,
    every expected dead letter there."""
    return bool(report["settled"] and not report["lost"] and not report["duplicate_final_verdicts"]
                and not report["released_while_unreviewed"] and not report["valid_dead_lettered"]
                and report["dead_letters"] == report["dead_letters_expected"])


def print_chaos_report(console: Console, report: dict) -> None:
    print_report(console, report, f"modpipe chaos: {report['drill']} ({report['run_id']})")
    table = Table(title="drill", show_header=False)
    for key in ("durable_stack", "published", "acknowledged", "not_acknowledged", "review_tasks",
                "dead_letters_expected", "released_while_unreviewed", "valid_dead_lettered", "killed_at_s", "down_s",
                "time_to_recover_s", "worker_restarts", "wall_s"):
        table.add_row(key, str(report[key]))
    for reason, count in report["dead_letters_by_reason"].items():
        table.add_row(f"dead letters {reason}", str(count))
    table.add_row("result", "[green]pass[/]" if chaos_passed(report) else "[red]FAIL[/]")
    console.print(table)
