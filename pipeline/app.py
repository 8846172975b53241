"""The Faust application: one image, several roles, each a thin agent over :mod:`pipeline.handlers`.

Each role is its own consumer group (``<prefix>modpipe-<role>``), so roles scale independently and a worker of
one role is never assigned partitions of another role's topic. Partitions are the unit of scale inside a role.

Delivery is at-least-once: an agent acknowledges a message only after its effects are published (the handlers
never raise). How a worker heals, without a person:

- A dependency outage pauses it (:class:`~pipeline.retry.Outages`): the batch in hand is retried, no new batch is
  taken, readiness is withdrawn; past ``worker.stall_exit_s`` it exits non-zero *without* acknowledging, so its
  supervisor restarts it and the broker redelivers. Start-up (Redis, the broker, the handler's model) is retried
  the same way within the same bound.
- Crash loops: every delivery is counted in Redis (:mod:`pipeline.store.attempts`); a batch that comes back is
  handled one record at a time, and a record the worker died on ``limits.max_attempts`` times alone is
  dead-lettered (``CrashLoop``) so the worker moves on.
- Gaps: the input topics are neither compacted nor transactional, so consecutive records of a partition have
  consecutive offsets. A record arriving past a gap (a broker that served a later record before an earlier one was
  readable: Tansu on S3 storage does under concurrent producers) makes the worker fetch the missing offsets
  itself and handle them first (``modpipe_offset_gaps_total``), so a skipped record is not a lost one.
- A monitor task measures the role's consumer lag every ``worker.monitor_interval_s`` (metric, Redis lag record,
  backlog flag for reasoning) and applies the offset rule: a committed offset beyond the log end (a recreated
  topic, a broker restored from an older copy) is reported and the partition restarts from the log start, so
  nothing still in the log is skipped (the idempotent ledger absorbs the re-reading). A worker whose partitions
  have work but that made no progress for ``worker.stall_exit_s`` exits non-zero too.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import faust

from pipeline import metrics
from pipeline.broker import PartitionLag, Publisher, ensure_topics, fetch_records, group_lag, record_at
from pipeline.codec import Record
from pipeline.config import Settings
from pipeline.effects import CrashLoop, Effects, outage_of
from pipeline.errors import BrokerUnavailable, PermanentError
from pipeline.faust_transport import App as FaustApp
from pipeline.faust_transport import reset_partition
from pipeline.retry import Outages, WorkerStalled
from pipeline.store import RedisStore
from pipeline.store.attempts import Attempts, RedisAttempts, write_lag

logger = logging.getLogger(__name__)

EXIT_UNRECOVERABLE = 70  # EX_SOFTWARE: a supervisor restarts the worker, the broker redelivers
EXIT_STALLED = 75  # EX_TEMPFAIL: a dependency stayed down or nothing moved past worker.stall_exit_s
EXIT_CONFIG = 78  # EX_CONFIG: the handler cannot be built at all (a missing artefact, a broken policy)


class Role(str, enum.Enum):
    TRIAGE = "triage"
    REASONING = "reasoning"
    REVIEW_INTAKE = "review-intake"


def record_from_event(event: faust.EventT) -> Record:
    message = event.message
    return Record(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        value=message.value,
        timestamp_ms=int(message.timestamp * 1000) if message.timestamp else None,
    )


def _die(role: Role, exc: BaseException, code: int = EXIT_UNRECOVERABLE, cause: str = "unrecoverable") -> None:
    """Exit without acknowledging: losing a message is worse than a restart (the supervisor restarts the worker)."""
    logger.critical("%s worker: %s; exiting (code %d) without acknowledging, for redelivery", role.value, exc, code)
    metrics.worker_exits_total.labels(cause).inc()
    logging.shutdown()
    os._exit(code)


def group_id(settings: Settings, role: Role) -> str:
    """The consumer group of a role (also the Faust app id)."""
    return f"{settings.kafka.topic_prefix}modpipe-{role.value}"


def role_topic(settings: Settings, role: Role) -> str:
    """The full name of the topic a role consumes."""
    return settings.kafka.topic(ROLE_SPECS[role](settings).topic)


def create_app(settings: Settings, role: Role) -> faust.App:
    """Build the Faust app for one role. Domain objects are created on worker start, not at import."""
    kafka = settings.kafka
    # Faust wants a data directory even with in-memory tables (we keep no state in Faust: Redis holds it).
    datadir = settings.state_dir / "faust" / role.value
    datadir.mkdir(parents=True, exist_ok=True)
    app = FaustApp(
        group_id(settings, role),
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
        consumer_max_fetch_size=settings.limits.fetch_max_bytes,
        broker=[f"kafka://{server}" for server in kafka.bootstrap_servers.split(",")],
        broker_session_timeout=kafka.session_timeout_s,
        broker_heartbeat_interval=kafka.heartbeat_interval_s,
        broker_commit_interval=kafka.commit_interval_s,
        broker_request_timeout=kafka.request_timeout_s,
        consumer_auto_offset_reset="earliest",
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        # Faust's exactly-once needs transactions; we rely on at-least-once plus the idempotent ledger instead.
        processing_guarantee="at_least_once",
        producer_acks=-1,
        web_enabled=False,
        autodiscover=False,
        store="memory://",
        datadir=str(datadir),
        value_serializer="raw",
        key_serializer="raw",
    )
    # What to close on shutdown, in the order opened (closed in reverse).
    closers: list[Callable[[], Awaitable[object]]] = []

    def topic(name: str) -> faust.TopicT:
        return app.topic(kafka.topic(name), value_serializer="raw", key_serializer="raw", partitions=kafka.partitions)

    ready_file = worker_ready_file(settings, role, os.getpid())
    state = _WorkerState()

    def publish_readiness() -> None:
        ready = state.handler_built and state.dependencies_up and bool(app.assignor.assigned_actives())
        metrics.worker_ready.set(1 if ready else 0)
        if ready:
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.write_text(str(os.getpid()))
        else:
            ready_file.unlink(missing_ok=True)

    def on_dependencies(up: bool) -> None:
        state.dependencies_up = up
        publish_readiness()

    outages = Outages(backoff_max_s=settings.worker.outage_backoff_max_s, stall_exit_s=settings.worker.stall_exit_s,
                      on_ready=on_dependencies)

    @app.on_partitions_assigned.connect
    async def _assigned(sender: faust.App, assigned: set, **_: object) -> None:
        publish_readiness()
        state.last_offset.clear()  # positions may have moved while other workers owned these partitions
        state.check_offsets_soon.set()  # a new assignment may bring a committed offset past the log end

    spec = ROLE_SPECS[role](settings)

    async def start_up() -> tuple[RedisStore, BatchHandler]:
        """Open Redis and the broker and build the handler, retried while a dependency is down (bounded)."""
        deadline = time.monotonic() + settings.worker.stall_exit_s
        attempt = 0
        while True:
            attempt += 1
            opened: list[Callable[[], Awaitable[object]]] = []
            try:
                await ensure_topics(kafka)
                store = RedisStore(settings.redis)
                opened.append(store.close)
                await store.ping()
                publisher = Publisher(kafka)
                await publisher.start()
                opened.append(publisher.stop)
                effects = Effects(kafka, store, publisher, limits=settings.limits, outages=outages,
                                  on_published=state.progressed)
                handler = await spec.build(store, effects, opened)
                closers.extend(opened)
                return store, handler
            except PermanentError as exc:
                _die(role, exc, EXIT_CONFIG, "start_failed")
            except Exception as exc:  # noqa: BLE001 - Redis, the broker or Triton not there yet: retry, bounded
                for close in reversed(opened):
                    try:
                        await close()
                    except Exception:  # noqa: BLE001 - half-open clients of a failed start
                        logger.debug("closing after a failed start", exc_info=True)
                if time.monotonic() > deadline:
                    _die(role, WorkerStalled(f"could not start within {settings.worker.stall_exit_s:.0f} s: {exc}"),
                         EXIT_STALLED, "start_failed")
                delay = min(settings.worker.outage_backoff_max_s, 0.25 * 2 ** min(attempt, 6))
                logger.warning("%s worker: start-up attempt %d failed (%s: %s); retrying in %.1f s", role.value,
                               attempt, type(exc).__name__, exc, delay)
                await asyncio.sleep(delay)

    @app.agent(topic(spec.topic), name=f"{role.value}_agent")
    async def agent(stream: faust.StreamT) -> None:
        """The one agent loop every role shares: build the handler, report ready, handle batches, never raise."""
        store, handler = await start_up()
        metrics.serve(settings.worker.metrics_port)
        async def fill(topic: str, partition: int, start: int, end: int) -> list[Record]:
            return [Record(topic, partition, offset, key, value, ts)
                    for offset, key, value, ts in await fetch_records(kafka, topic, partition, start, end)]

        runner = BatchRunner(handler, RedisAttempts(store), settings.limits.max_attempts, state, fill_gap=fill)
        monitor = PartitionMonitor(app, settings, role, store, state)
        app_tasks = [asyncio.create_task(monitor.run(), name=f"{role.value}-monitor")]
        closers.append(lambda: _cancel(app_tasks))
        state.handler_built = True
        publish_readiness()
        async for events in stream.take_events(spec.batch_size, within=spec.within_s):
            try:
                await runner.run([record_from_event(e) for e in events])
            except WorkerStalled as exc:
                _die(role, exc, EXIT_STALLED, "stalled")
            except Exception as exc:  # noqa: BLE001 - see _die
                _die(role, exc)

    @app.on_before_shutdown.connect
    async def _close(sender: faust.App, **_: object) -> None:
        ready_file.unlink(missing_ok=True)
        for close in reversed(closers):
            await close()

    return app


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class _WorkerState:
    """What the agent, the monitor and readiness share inside one worker process."""

    handler_built: bool = False
    dependencies_up: bool = True
    last_progress: float = field(default_factory=time.monotonic)
    batches: int = 0
    check_offsets_soon: asyncio.Event = field(default_factory=asyncio.Event)
    # (topic, partition) -> the last offset handled: gap detection; cleared on every assignment
    last_offset: dict[tuple[str, int | None], int] = field(default_factory=dict)

    def progressed(self) -> None:
        """Something was handled or published: the stall clock starts again."""
        self.last_progress = time.monotonic()


class BatchRunner:
    """Hands batches to a handler with crash-loop protection (see the module docstring).

    A first delivery of every record in the batch is handled as one batch. Once any record of a batch comes back
    (the worker died before acknowledging it), the batch is handled one record at a time, each counted alone;
    a record delivered alone more than ``max_attempts`` times is dead-lettered as a :class:`CrashLoop`.
    """

    def __init__(self, handler: BatchHandler, attempts: Attempts, max_attempts: int,
                 state: _WorkerState | None = None,
                 fill_gap: Callable[[str, int, int, int], Awaitable[list[Record]]] | None = None) -> None:
        self.handler = handler
        self.fill_gap = fill_gap
        self.attempts = attempts
        self.effects = handler.effects  # crash-loop dead letters go where the handler's go, with its outages
        self.stage = handler.stage
        self.max_attempts = max_attempts
        self.state = state or _WorkerState()
        self.last_offset = self.state.last_offset

    async def _counted(self, call: Callable[[], Awaitable[Any]]) -> Any:
        """A store call that waits out a Redis outage like any other (counts must not be skipped)."""
        while True:
            try:
                return await call()
            except Exception as exc:  # noqa: BLE001 - only outages are retried here
                if (dependency := outage_of(exc)) is None:
                    raise
                await self.effects.outages.wait(dependency, exc, "attempt counts")

    async def _gaps(self, records: Sequence[Record]) -> list[Record]:
        """The records a gap before ``records`` skipped, fetched from the log (see the module docstring)."""
        missing: list[Record] = []
        for record in sorted(records, key=lambda r: (r.topic, r.partition or 0, r.offset or 0)):
            if record.offset is None:
                continue
            where = (record.topic, record.partition)
            last = self.last_offset.get(where)
            if last is not None and record.offset > last + 1 and self.fill_gap is not None \
                    and record.partition is not None:
                logger.warning("%s: %s[%d] jumped from offset %d to %d: fetching the %d skipped record(s)",
                               self.stage, record.topic, record.partition, last, record.offset,
                               record.offset - last - 1)
                metrics.offset_gaps_total.labels(self.stage).inc()
                fetched = await self.fill_gap(record.topic, record.partition, last + 1, record.offset)
                if len(fetched) < record.offset - last - 1:
                    logger.error("%s: %s[%d] offsets %d..%d: only %d record(s) in the log", self.stage,
                                 record.topic, record.partition, last + 1, record.offset - 1, len(fetched))
                missing.extend(fetched)
            # A seek back (offset rule, rebalance) or a first record: no gap, the new position counts.
            self.last_offset[where] = record.offset
        return missing

    async def run(self, records: Sequence[Record]) -> None:
        skipped = await self._gaps(records)
        if skipped:
            await self._run(skipped)
        await self._run(records)
        self.state.progressed()

    async def _run(self, records: Sequence[Record]) -> None:
        counts = await self._counted(lambda: self.attempts.begin(records, solo=False))
        if max(counts, default=1) <= 1:
            await self.handler.handle_batch(records)
            await self._counted(lambda: self.attempts.done(records))
        else:
            logger.warning("%s: a batch of %d came back (the worker died on it): handling it one record at a time",
                           self.stage, len(records))
            for record in records:
                await self._alone(record)
        self.state.batches += 1

    async def _alone(self, record: Record) -> None:
        (count,) = await self._counted(lambda: self.attempts.begin([record], solo=True))
        if count > self.max_attempts:
            metrics.crash_loop_dead_letters_total.labels(self.stage).inc()
            await self.effects.dead_letter(
                record, self.stage,
                CrashLoop(f"the worker died {count - 1} times handling this record alone (limit {self.max_attempts})"),
                attempts=count - 1,
            )
        else:
            await self.handler.handle_batch([record])
        await self._counted(lambda: self.attempts.done([record]))


@dataclass(frozen=True)
class OffsetCheck:
    """What the offset rule decided for one partition (see :func:`offset_rule`)."""

    partition: int
    committed: int
    end: int
    reset_to: int | None  # None: the offset is fine (the broker only reported a stale end)


async def offset_rule(settings: Settings, topic: str, lag: PartitionLag) -> OffsetCheck | None:
    """The documented rule for a committed offset beyond the reported log end.

    A broker may report a stale end after a restart while the records are there (Tansu on S3 storage does), so
    the rule first looks for the record just before the committed offset: if it is there, the log really reaches
    the committed offset and nothing happens. If it is not, the log under the offset is another one (a recreated
    topic, a broker restored from an older copy) and the partition restarts from the log start: everything still
    in the log is read again (the ledger makes that idempotent) and nothing in it is skipped. Never "latest":
    that would skip whatever arrived since the topic came back.
    """
    if not lag.beyond_end or lag.committed is None:
        return None
    if lag.committed > 0 and await record_at(settings.kafka, topic, lag.partition, lag.committed - 1):
        return OffsetCheck(lag.partition, lag.committed, lag.end, None)
    return OffsetCheck(lag.partition, lag.committed, lag.end, lag.start)


class PartitionMonitor:
    """Every ``worker.monitor_interval_s``: the role's lag (metric and Redis lag record; the reasoning backlog
    flag), the offset rule on the partitions this worker owns, and the stall check."""

    def __init__(self, app: faust.App, settings: Settings, role: Role, store: RedisStore, state: _WorkerState) -> None:
        self.app = app
        self.settings = settings
        self.role = role
        self.store = store
        self.state = state
        self.topic = role_topic(settings, role)
        self.group = group_id(settings, role)
        self.backlog = False
        self.verified: dict[int, int] = {}  # partition -> committed offset already found to be in the log

    async def run(self) -> None:
        interval = self.settings.worker.monitor_interval_s
        while True:
            try:
                await asyncio.wait_for(self.state.check_offsets_soon.wait(), interval)
            except asyncio.TimeoutError:
                pass
            self.state.check_offsets_soon.clear()
            try:
                await self.check()
            except WorkerStalled as exc:
                _die(self.role, exc, EXIT_STALLED, "stalled")
            except BrokerUnavailable as exc:
                logger.info("%s monitor: %s", self.role.value, exc)  # the agent's own outage handling reports it
            except Exception:  # noqa: BLE001 - the monitor must outlive a hiccup; the agent does the real work
                logger.warning("%s monitor: check failed", self.role.value, exc_info=True)

    def owned(self) -> set[int]:
        return {tp.partition for tp in self.app.consumer.assignment() if tp.topic == self.topic}

    async def check(self) -> None:
        lags = await group_lag(self.settings.kafka, self.group, self.topic)
        owned = self.owned()
        for lag in lags:
            if lag.partition not in owned or not lag.beyond_end or self.verified.get(lag.partition) == lag.committed:
                continue
            decision = await offset_rule(self.settings, self.topic, lag)
            if decision is None or decision.reset_to is None:
                if decision is not None:  # a stale end: do not probe the same offset again
                    self.verified[lag.partition] = decision.committed
                continue
            logger.error("%s: %s[%d] committed offset %d is beyond the log end %d (topic recreated or broker "
                         "restored): restarting the partition from the log start %d", self.role.value, self.topic,
                         lag.partition, decision.committed, decision.end, decision.reset_to)
            if await reset_partition(self.app, self.topic, lag.partition, decision.reset_to):
                metrics.offset_resets_total.labels(self.role.value).inc()
                self.state.last_progress = time.monotonic()
        total = sum(lag.lag for lag in lags)
        mine = sum(lag.lag for lag in lags if lag.partition in owned)
        metrics.consumer_lag.labels(self.role.value).set(mine)
        bound = self.settings.limits.reasoning_backlog if self.role is Role.REASONING else None
        exceeded = bound is not None and total > bound
        metrics.backlog_exceeded.labels(self.role.value).set(1 if exceeded else 0)
        if exceeded != self.backlog:
            self.backlog = exceeded
            log = logger.warning if exceeded else logger.info
            log("%s backlog %s: %d escalations waiting (bound %s)", self.role.value,
                "exceeded" if exceeded else "back under its bound", total, bound)
        try:
            await write_lag(self.store, self.role.value, {"lag": total, "bound": bound, "exceeded": exceeded,
                                                          "partitions": {str(x.partition): x.lag for x in lags}},
                            ttl_s=3 * self.settings.worker.monitor_interval_s)
        except Exception:  # noqa: BLE001 - Redis down: the agent pauses and reports it; the lag record can wait
            logger.debug("lag record not written", exc_info=True)
        if mine == 0:
            self.state.last_progress = time.monotonic()
            return
        if not self.state.dependencies_up:
            return  # an outage has its own bound (Outages.stall_exit_s)
        idle = time.monotonic() - self.state.last_progress
        if idle > self.settings.worker.stall_exit_s:
            raise WorkerStalled(f"{mine} messages wait on this worker's partitions and none was handled for "
                                f"{idle:.0f} s")


class BatchHandler(Protocol):
    stage: str
    effects: Effects

    async def handle_batch(self, records: Sequence[Record]) -> None: ...


@dataclass(frozen=True)
class RoleSpec:
    """What one role consumes, in which batches, and how its handler is built on worker start."""

    topic: str  # the unprefixed topic name (a ``KafkaSettings.*_topic`` value)
    batch_size: int
    within_s: float
    # (store, effects, closers) -> handler; anything it opens that needs closing goes on ``closers``
    build: Callable[[RedisStore, Effects, list[Callable[[], Awaitable[object]]]], Awaitable[BatchHandler]]


# Embedding batches per take of the triage agent (see _triage_spec).
TRIAGE_TAKE_CHUNKS = 4


def _triage_spec(settings: Settings) -> RoleSpec:
    async def build(store: RedisStore, effects: Effects, closers: list) -> BatchHandler:
        from pipeline.handlers import TriageHandler
        from pipeline.lifecycle.wiring import live_policies
        from pipeline.triage import TriageModel

        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        closers.append(lambda: asyncio.to_thread(executor.shutdown, wait=False))
        model = await loop.run_in_executor(
            executor,
            functools.partial(TriageModel.load, settings.triage.model_dir, settings=settings.triage,
                              triton_grpc_url=settings.triton.grpc_url),
        )
        # Load the embedder now, not on the first message: readiness must mean "can score at full speed".
        await loop.run_in_executor(executor, model.warm_up)
        # The enforcing policy versions follow the registry, so a triage verdict cites the version that enforces
        # (and routes by its metadata) after a promotion or rollback, without a restart.
        live = await live_policies(settings, store, "triage", closers, start=False)
        handler = TriageHandler(model, live.library, effects, max_text_chars=settings.triage.max_text_chars,
                                executor=executor, embed_batch=settings.triage.batch_size)
        live.subscribe(handler.use_library)
        live.start()
        logger.info("triage worker ready: model %s; enforcing %s", model.version,
                    ", ".join(f"{p.policy_id}@{p.version}" for p in live.library))
        return handler

    # Up to TRIAGE_TAKE_CHUNKS embedding batches are taken at once, so that under load one chunk's effects are
    # published while the next chunk is embedded; a take holding one batch or less (light load) is one chunk.
    return RoleSpec(settings.kafka.incoming_topic, settings.triage.batch_size * TRIAGE_TAKE_CHUNKS,
                    settings.triage.batch_within_s, build)


def _reasoning_spec(settings: Settings) -> RoleSpec:
    async def build(store: RedisStore, effects: Effects, closers: list) -> BatchHandler:
        from pipeline.lifecycle.wiring import reasoning_handler

        # The enforcing policy versions follow the registry (promotions, rollbacks); shadow judgements run here.
        return await reasoning_handler(settings, store, effects, closers)

    # A batch is judged concurrently (many generate calls in flight), then acknowledged together.
    return RoleSpec(settings.kafka.escalations_topic, settings.triton.max_in_flight, 0.05, build)


def _review_intake_spec(settings: Settings) -> RoleSpec:
    async def build(store: RedisStore, effects: Effects, closers: list) -> BatchHandler:
        from pipeline.handlers import ReviewIntakeHandler
        from pipeline.policies import PolicyLibrary
        from pipeline.review.queue import ReviewQueue, severities_from

        library = PolicyLibrary.from_settings(settings.reasoner, strict=False)
        queue = ReviewQueue(store, severities_from(library))
        return ReviewIntakeHandler(store, queue, effects)

    return RoleSpec(settings.kafka.review_topic, 64, 0.05, build)


ROLE_SPECS: dict[Role, Callable[[Settings], RoleSpec]] = {
    Role.TRIAGE: _triage_spec,
    Role.REASONING: _reasoning_spec,
    Role.REVIEW_INTAKE: _review_intake_spec,
}


def worker_ready_file(settings: Settings, role: Role, pid: int) -> Path:
    """Written once a worker has built its handler and owns partitions: the demo waits for it."""
    return settings.state_dir / "workers" / f"{role.value}-{pid}.ready"


def run_worker(settings: Settings, role: Role) -> None:
    """Run one role's worker in the foreground until SIGTERM/SIGINT."""
    app = create_app(settings, role)
    worker = faust.Worker(app, loglevel=settings.worker.log_level, override_logging=False)
    worker.execute_from_commandline()
