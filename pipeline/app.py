"""The Faust application: one image, several roles, each a thin agent over :mod:`pipeline.handlers`.

Each role is its own consumer group (``<prefix>modpipe-<role>``), so roles scale independently and a worker of
one role is never assigned partitions of another role's topic. Partitions are the unit of scale inside a role.

Delivery is at-least-once: an agent acknowledges a message only after its effects are published (the handlers
never raise). If even dead-lettering fails (the broker is gone), the worker exits *without* acknowledging, so the
message is redelivered after restart rather than lost.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import faust

from pipeline import metrics
from pipeline.config import Settings
from pipeline.faust_transport import App as FaustApp
from pipeline.broker import Publisher, ensure_topics
from pipeline.codec import Record
from pipeline.effects import Effects
from pipeline.store import RedisStore

logger = logging.getLogger(__name__)

EXIT_UNRECOVERABLE = 70  # EX_SOFTWARE: a supervisor restarts the worker, the broker redelivers


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


def _die(role: Role, exc: BaseException) -> None:
    """Exit without acknowledging: losing a message is worse than a restart."""
    logger.critical("%s worker: cannot publish even a dead letter (%s); exiting for redelivery", role.value, exc)
    logging.shutdown()
    os._exit(EXIT_UNRECOVERABLE)


def create_app(settings: Settings, role: Role) -> faust.App:
    """Build the Faust app for one role. Domain objects are created on worker start, not at import."""
    kafka = settings.kafka
    # Faust wants a data directory even with in-memory tables (we keep no state in Faust: Redis holds it).
    datadir = settings.state_dir / "faust" / role.value
    datadir.mkdir(parents=True, exist_ok=True)
    app = FaustApp(
        f"{kafka.topic_prefix}modpipe-{role.value}",
        fetch_max_wait_ms=kafka.fetch_max_wait_ms,
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

    async def open_common() -> tuple[RedisStore, Publisher]:
        await ensure_topics(kafka)
        store = RedisStore(settings.redis)
        await store.ping()
        publisher = Publisher(kafka)
        await publisher.start()
        closers.extend([store.close, publisher.stop])
        metrics.serve(settings.worker.metrics_port)
        return store, publisher

    handler_ready = asyncio.Event()
    ready_file = worker_ready_file(settings, role, os.getpid())

    def mark_ready_if_assigned() -> None:
        if handler_ready.is_set() and app.assignor.assigned_actives():
            ready_file.parent.mkdir(parents=True, exist_ok=True)
            ready_file.write_text(str(os.getpid()))

    @app.on_partitions_assigned.connect
    async def _assigned(sender: faust.App, assigned: set, **_: object) -> None:
        mark_ready_if_assigned()

    spec = ROLE_SPECS[role](settings)

    @app.agent(topic(spec.topic), name=f"{role.value}_agent")
    async def agent(stream: faust.StreamT) -> None:
        """The one agent loop every role shares: build the handler, report ready, handle batches, never raise."""
        store, publisher = await open_common()
        handler = await spec.build(store, publisher, closers)
        handler_ready.set()
        mark_ready_if_assigned()
        async for events in stream.take_events(spec.batch_size, within=spec.within_s):
            try:
                await handler.handle_batch([record_from_event(e) for e in events])
            except Exception as exc:  # noqa: BLE001 - see _die
                _die(role, exc)

    @app.on_before_shutdown.connect
    async def _close(sender: faust.App, **_: object) -> None:
        for close in reversed(closers):
            await close()

    return app


class BatchHandler(Protocol):
    async def handle_batch(self, records: Sequence[Record]) -> None: ...


@dataclass(frozen=True)
class RoleSpec:
    """What one role consumes, in which batches, and how its handler is built on worker start."""

    topic: str  # the unprefixed topic name (a ``KafkaSettings.*_topic`` value)
    batch_size: int
    within_s: float
    # (store, publisher, closers) -> handler; anything it opens that needs closing goes on ``closers``
    build: Callable[[RedisStore, Publisher, list[Callable[[], Awaitable[object]]]], Awaitable[BatchHandler]]


def _triage_spec(settings: Settings) -> RoleSpec:
    async def build(store: RedisStore, publisher: Publisher, closers: list) -> BatchHandler:
        from pipeline.handlers import TriageHandler
        from pipeline.policies import PolicyLibrary
        from pipeline.triage import TriageModel

        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        model = await loop.run_in_executor(
            executor,
            functools.partial(TriageModel.load, settings.triage.model_dir, settings=settings.triage,
                              triton_grpc_url=settings.triton.grpc_url),
        )
        # Load the embedder now, not on the first message: readiness must mean "can score at full speed".
        await loop.run_in_executor(executor, model.warm_up)
        library = PolicyLibrary.from_settings(settings.reasoner)
        logger.info("triage worker ready: model %s", model.version)
        return TriageHandler(model, library, Effects(settings.kafka, store, publisher),
                             max_text_chars=settings.triage.max_text_chars, executor=executor)

    # Batches are embedded together in the executor.
    return RoleSpec(settings.kafka.incoming_topic, settings.triage.batch_size, settings.triage.batch_within_s, build)


def _reasoning_spec(settings: Settings) -> RoleSpec:
    async def build(store: RedisStore, publisher: Publisher, closers: list) -> BatchHandler:
        from pipeline.handlers import ReasoningHandler
        from pipeline.policies import PolicyLibrary
        from pipeline.reasoner import build_reasoner

        library = PolicyLibrary.from_settings(settings.reasoner)
        reasoner = build_reasoner(settings, library)
        await reasoner.start()
        closers.append(reasoner.close)
        if settings.reasoner.backend == "triton":
            from pipeline.reasoner.backends.triton import http_ready

            # Not a gate: an unready model fails closed to review until it comes up.
            if not await http_ready(settings.triton):
                logger.warning("triton at %s does not report %s ready yet; its items go to review until it does",
                               settings.triton.http_url, settings.triton.reasoner_model)
        logger.info("reasoning worker ready: model %s", reasoner.model)
        return ReasoningHandler(reasoner, library, Effects(settings.kafka, store, publisher))

    # A batch is judged concurrently (many generate calls in flight), then acknowledged together.
    return RoleSpec(settings.kafka.escalations_topic, settings.triton.max_in_flight, 0.05, build)


def _review_intake_spec(settings: Settings) -> RoleSpec:
    async def build(store: RedisStore, publisher: Publisher, closers: list) -> BatchHandler:
        from pipeline.handlers import ReviewIntakeHandler
        from pipeline.policies import PolicyLibrary
        from pipeline.review.queue import ReviewQueue, severities_from

        library = PolicyLibrary.from_settings(settings.reasoner, strict=False)
        queue = ReviewQueue(store, severities_from(library))
        return ReviewIntakeHandler(store, queue, Effects(settings.kafka, store, publisher))

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
