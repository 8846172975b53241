"""A stand-in for the triage worker role, for gateway tests: the real handler, a scripted scorer, real Kafka and Redis.

:class:`TriagePump` does what a triage worker does to what the gateway publishes (``pipeline.app``'s agent loop,
minus Faust): it consumes ``content.incoming`` in the triage role's consumer group (``<prefix>modpipe-triage``,
so the gateway's lag reading sees its commits), runs :class:`pipeline.handlers.TriageHandler` with the real
store and acknowledged publisher, and commits after each batch. The scorer is
:class:`pipeline.triage.fakes.ScriptedScorer`: scores are given per text in advance, and a text outside the script
is dead-lettered by the handler (as a broken embedder would make it), so a test sees it. Nothing here is used by
the product; the embedder is what it leaves out (minutes to load on a small machine, and not under test).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from aiokafka import AIOKafkaConsumer

from pipeline.broker import Publisher
from pipeline.codec import Record
from pipeline.config import Settings
from pipeline.effects import Effects
from pipeline.gateway.backpressure import triage_group
from pipeline.handlers import TriageHandler
from pipeline.policies import PolicyLibrary
from pipeline.store.redis import RedisStore
from pipeline.triage.fakes import SCRIPTED_THRESHOLDS, ScriptedScorer

logger = logging.getLogger(__name__)

QUIET = {"H": 0.01, "HR": 0.01, "S": 0.0, "S3": 0.0, "SH": 0.0, "V": 0.01}


def scores(violation: float, **categories: float) -> tuple[float, dict[str, float]]:
    """One script entry: the violation score and the category scores (the rest quiet)."""
    return violation, {**QUIET, **categories}


ALLOW = scores(0.01)
BLOCK_VIOLENCE = scores(0.97, V=0.95, V2=0.7)
ESCALATE = scores(0.5, V=0.45)


class TriagePump:
    """Consume ``content.incoming`` as the triage role would, with ``script`` as the classifier's answers."""

    def __init__(self, settings: Settings, script: dict[str, tuple[float, dict[str, float]]],
                 library: PolicyLibrary | None = None) -> None:
        self.settings = settings
        self.scorer = ScriptedScorer(SCRIPTED_THRESHOLDS, dict(script))
        self.library = library or PolicyLibrary.from_settings(settings.reasoner)
        self._task: asyncio.Task[None] | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self.handled = 0

    async def start(self) -> None:
        kafka = self.settings.kafka
        self._store = RedisStore(self.settings.redis)
        self._publisher = Publisher(kafka)
        await self._publisher.start()
        effects = Effects(kafka, self._store, self._publisher, limits=self.settings.limits)
        self._handler = TriageHandler(self.scorer, self.library, effects,
                                      max_text_chars=self.settings.triage.max_text_chars)
        self._consumer = AIOKafkaConsumer(
            kafka.topic(kafka.incoming_topic), bootstrap_servers=kafka.bootstrap_servers,
            group_id=triage_group(self.settings), enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=int(kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(kafka.heartbeat_interval_s * 1000), fetch_max_wait_ms=50,
        )
        await self._consumer.start()
        self._task = asyncio.create_task(self._run(), name="triage-pump")

    async def wait_assigned(self, timeout_s: float = 30.0) -> None:
        """Until the group gave this consumer its partitions (joins wait for the session timeout)."""
        assert self._consumer is not None
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not self._consumer.assignment():
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError("the triage pump got no partitions")
            await asyncio.sleep(0.05)

    async def _run(self) -> None:
        assert self._consumer is not None
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=32)
            for tp, messages in batches.items():
                records = [Record(m.topic, m.partition, m.offset, m.key, m.value, m.timestamp) for m in messages]
                await self._handler.handle_batch(records)
                self.handled += len(records)
            if batches:
                await self._consumer.commit()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._consumer is not None:
            await self._consumer.stop()
        await self._publisher.stop()
        await self._store.close()
