"""The webhook deliverer role (``modpipe webhooks deliver``): ``moderation.verdicts`` in, signed POSTs out.

A plain aiokafka consumer in its own group (``<topic_prefix>modpipe-webhooks``), so it scales by replicas up to the
verdict topic's partitions, like the worker roles, and never slows them. For every *final* verdict of a platform
that has a webhook (registered before the verdict was decided) it makes a
:class:`~pipeline.schemas.WebhookDelivery` (``verdict.final``, or ``verdict.superseding`` when the verdict
replaces another) and sends it.

Guarantees and how they are kept:

* **In order per content id.** Verdicts of one item share a partition (keyed by content id); each content id has
  one lane that sends its deliveries one after the other, while lanes of different ids run side by side. A
  delivery that is dead-lettered parks its content id, and later deliveries for it queue behind the dead letter
  (:mod:`pipeline.webhooks.registry`) until ``modpipe webhooks replay`` sends them in order.
* **At least once.** A partition's offset is committed only up to the first message not yet delivered or
  dead-lettered; a crash or a rebalance redelivers the rest, with the same ``delivery_id`` (receivers dedupe).
* **Bounded.** Each delivery is tried ``webhooks.max_attempts`` times with backoff (:mod:`~.sender`), then
  dead-lettered. A platform with ``webhooks.suspend_after`` dead letters in a row is suspended: its deliveries
  are parked at once (no lane waits minutes on a dead endpoint), one probe attempt every
  ``webhooks.probe_interval_s``; the first success resumes it. More than ``webhooks.max_pending`` deliveries held
  pauses fetching.
* **Outages pause.** Redis unreachable: every store call waits and tries again; nothing is dropped.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import StoreUnavailable
from pipeline.schemas import Verdict, VerdictStatus, WebhookDelivery, WebhookEvent, validate_wire
from pipeline.store.redis import RedisStore
from pipeline.webhooks.registry import DeadLetter, SigningKeyMissing, Webhook, WebhookRegistry, delivery_id
from pipeline.webhooks.sender import Attempt, Sender

logger = logging.getLogger(__name__)

T = TypeVar("T")
HOOKS_REFRESH_S = 5.0  # a `webhooks add` / `remove` reaches running deliverers within this


def webhooks_group(settings: Settings) -> str:
    return f"{settings.kafka.topic_prefix}modpipe-webhooks"


def signing_key(settings: Settings) -> str:
    key = settings.webhooks.signing_key
    if key is None or not key.get_secret_value():
        raise SigningKeyMissing("MODPIPE_WEBHOOKS__SIGNING_KEY is not set: webhook secrets are derived from it")
    return key.get_secret_value()


def delivery_for(verdict: Verdict) -> WebhookDelivery:
    assert verdict.platform is not None
    return WebhookDelivery(
        delivery_id=delivery_id(verdict.platform, verdict.verdict_id),
        event=WebhookEvent.SUPERSEDING if verdict.supersedes else WebhookEvent.FINAL,
        platform=verdict.platform, content_id=verdict.content_id, revision=verdict.revision,
        decision=verdict.decision, supersedes=verdict.supersedes, verdict=verdict,
    )


@dataclass
class Job:
    tp: TopicPartition
    offset: int
    delivery: WebhookDelivery


class Offsets:
    """Per partition, the offsets taken and not yet finished: commit up to the first unfinished one."""

    def __init__(self) -> None:
        self.open: dict[TopicPartition, set[int]] = collections.defaultdict(set)
        self.next: dict[TopicPartition, int] = {}

    def take(self, tp: TopicPartition, offset: int) -> None:
        self.open[tp].add(offset)
        self.next[tp] = max(self.next.get(tp, 0), offset + 1)

    def finish(self, tp: TopicPartition, offset: int) -> None:
        self.open[tp].discard(offset)

    def committable(self, tp: TopicPartition) -> int | None:
        pending = self.open.get(tp)
        return min(pending) if pending else self.next.get(tp)

    def drop(self, tp: TopicPartition) -> None:
        self.open.pop(tp, None)
        self.next.pop(tp, None)


@dataclass
class Health:
    dead_in_a_row: int = 0
    suspended_until: float | None = None


@dataclass
class _Lane:
    tp: TopicPartition
    jobs: collections.deque[Job] = field(default_factory=collections.deque)
    task: asyncio.Task[None] | None = None


class Deliverer:
    """The deliverer; :meth:`run` until :meth:`stop`."""

    def __init__(self, settings: Settings, *, store: RedisStore | None = None, sender: Sender | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.config = settings.webhooks
        self.key = signing_key(settings)
        self.store = store or RedisStore(settings.redis)
        self.registry = WebhookRegistry(self.store, settings.redis.verdict_ttl_s)
        self._sender = sender
        self.clock = clock
        self.topic = settings.kafka.topic(settings.kafka.verdicts_topic)
        self.group = webhooks_group(settings)
        self.hooks: dict[str, Webhook] = {}
        self._hooks_at = float("-inf")
        self.health: dict[str, Health] = collections.defaultdict(Health)
        self.lanes: dict[str, _Lane] = {}
        self.offsets = Offsets()
        self.committed: dict[TopicPartition, int] = {}
        self.pending = 0
        self.assigned = asyncio.Event()
        self._stopping = asyncio.Event()
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def sender(self) -> Sender:
        if self._sender is None:
            self._sender = Sender(self.config)
        return self._sender

    def stop(self) -> None:
        self._stopping.set()

    # -- the loop -------------------------------------------------------------------------------------------------

    async def run(self) -> None:
        kafka = self.settings.kafka
        await self._store_call(self.store.ping)
        await self._refresh_hooks(force=True)
        consumer = AIOKafkaConsumer(
            bootstrap_servers=kafka.bootstrap_servers, group_id=self.group, enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=int(kafka.session_timeout_s * 1000),
            heartbeat_interval_ms=int(kafka.heartbeat_interval_s * 1000), fetch_max_wait_ms=kafka.fetch_max_wait_ms,
            request_timeout_ms=int(kafka.request_timeout_s * 1000),
        )
        self._consumer = consumer
        consumer.subscribe([self.topic], listener=_Rebalance(self))
        await consumer.start()
        # Serving metrics means "Redis and the broker answered": the probes of the role read it.
        metrics.serve(self.config.metrics_port)
        logger.info("webhooks: delivering final verdicts from %s (group %s) for %d platforms", self.topic, self.group,
                    len(self.hooks))
        last_commit = time.monotonic()
        try:
            while not self._stopping.is_set():
                await self._refresh_hooks()
                room = self.config.max_pending - self.pending
                if room <= 0:
                    consumer.pause(*consumer.assignment())
                elif consumer.paused():
                    consumer.resume(*consumer.paused())
                batches = await consumer.getmany(timeout_ms=200, max_records=max(1, min(500, room)))
                for tp, messages in batches.items():
                    for message in messages:
                        self._take(tp, message.offset, message.value)
                if time.monotonic() - last_commit >= self.settings.kafka.commit_interval_s:
                    await self._commit()
                    last_commit = time.monotonic()
        finally:
            await self._commit()
            tasks = [lane.task for lane in self.lanes.values() if lane.task is not None]
            for cid in list(self.lanes):
                self._cancel_lane(cid)  # not finished: redelivered to whoever owns the partition next
            await asyncio.gather(*tasks, return_exceptions=True)
            await consumer.stop()
            if self._sender is not None:
                await self._sender.close()
            await self.store.close()

    def _take(self, tp: TopicPartition, offset: int, value: bytes | None) -> None:
        self.offsets.take(tp, offset)
        job = self._job(tp, offset, value)
        if job is None:
            self.offsets.finish(tp, offset)
            return
        cid = job.delivery.content_id
        lane = self.lanes.get(cid)
        if lane is None:
            lane = self.lanes[cid] = _Lane(tp)
        lane.jobs.append(job)
        self.pending += 1
        metrics.webhook_pending.set(self.pending)
        if lane.task is None:
            lane.task = asyncio.create_task(self._run_lane(cid, lane), name=f"webhook-lane-{cid}")

    def _job(self, tp: TopicPartition, offset: int, value: bytes | None) -> Job | None:
        """The delivery a verdict message makes, or None (not final, no platform, no webhook, unreadable)."""
        try:
            verdict = validate_wire(Verdict, json.loads(value or b""))
        except (ValueError, ValidationError, RecursionError):
            logger.warning("webhooks: %s[%d]@%d is not a readable verdict; skipped", tp.topic, tp.partition, offset)
            return None
        if verdict.status is not VerdictStatus.FINAL or verdict.platform is None:
            return None
        hook = self.hooks.get(verdict.platform)
        if hook is None or verdict.decided_at.timestamp() < hook.created_at:
            return None
        return Job(tp, offset, delivery_for(verdict))

    async def _run_lane(self, cid: str, lane: _Lane) -> None:
        try:
            while lane.jobs:
                job = lane.jobs[0]
                await self._deliver(job)
                lane.jobs.popleft()
                self.pending -= 1
                metrics.webhook_pending.set(self.pending)
                self.offsets.finish(job.tp, job.offset)
        finally:
            if self.lanes.get(cid) is lane:
                del self.lanes[cid]

    def _cancel_lane(self, cid: str) -> None:
        lane = self.lanes.pop(cid)
        self.pending -= len(lane.jobs)
        metrics.webhook_pending.set(self.pending)
        if lane.task is not None:
            lane.task.cancel()

    async def _commit(self) -> None:
        consumer = self._consumer
        if consumer is None:
            return
        offsets = {}
        for tp in consumer.assignment():
            offset = self.offsets.committable(tp)
            if offset is not None and offset > self.committed.get(tp, -1):
                offsets[tp] = offset
        if not offsets:
            return
        try:
            await consumer.commit(offsets)
            self.committed.update(offsets)
        except KafkaError as exc:  # a rebalance in progress, a broker blip: the next commit catches up
            logger.info("webhooks: commit failed (%s); retried at the next interval", type(exc).__name__)

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Partitions leaving this member: commit what is done, drop the rest (the next owner redelivers it)."""
        await self._commit()
        for cid in [c for c, lane in self.lanes.items() if lane.tp in partitions]:
            self._cancel_lane(cid)
        for tp in partitions:
            self.offsets.drop(tp)
            self.committed.pop(tp, None)

    # -- one delivery ---------------------------------------------------------------------------------------------

    async def _deliver(self, job: Job) -> None:
        d = job.delivery

        def letter(reason: str, attempts: int, error: str) -> DeadLetter:
            return DeadLetter(d, reason, attempts, error, self.clock())

        if await self._store_call(lambda: self.registry.park_if_parked(letter("parked", 0, "behind a dead letter"))):
            metrics.webhook_deliveries_total.labels("parked").inc()
            return
        state = self._state(d.platform)
        if state == "suspended":
            await self._store_call(lambda: self.registry.dead_letter(
                letter("suspended", 0, "platform suspended after consecutive dead letters")))
            metrics.webhook_deliveries_total.labels("parked").inc()
            return
        attempts = 1 if state == "probe" else self.config.max_attempts
        last: Attempt | None = None
        for number in range(1, attempts + 1):
            hook = self.hooks.get(d.platform)
            if hook is None:
                logger.info("webhooks: %s's webhook was removed; %s not delivered", d.platform, d.delivery_id)
                return
            last = await self.sender.attempt(hook.url, hook.secret(self.key), d, number)
            if last.ok:
                self._succeeded(d.platform)
                metrics.webhook_deliveries_total.labels("delivered").inc()
                metrics.webhook_delivery_seconds.observe(max(0.0, self.clock() - d.verdict.decided_at.timestamp()))
                return
            logger.debug("webhooks: %s attempt %d for %s failed: %s", d.delivery_id, number, d.content_id, last.error)
            if number < attempts:
                await asyncio.sleep(self.sender.delay(number, last))
        assert last is not None
        await self._store_call(lambda: self.registry.dead_letter(letter("attempts", attempts, last.error)))
        metrics.webhook_deliveries_total.labels("dead_lettered").inc()
        logger.warning("webhooks: %s for %s %s r%d dead-lettered after %d attempts (%s)", d.delivery_id, d.platform,
                       d.content_id, d.revision, attempts, last.error)
        self._failed(d.platform)

    def _state(self, platform: str) -> str:
        health = self.health[platform]
        if health.suspended_until is None:
            return "ok"
        now = self.clock()
        if now >= health.suspended_until:
            health.suspended_until = now + self.config.probe_interval_s  # one probe at a time
            return "probe"
        return "suspended"

    def _failed(self, platform: str) -> None:
        health = self.health[platform]
        health.dead_in_a_row += 1
        if health.dead_in_a_row >= self.config.suspend_after and health.suspended_until is None:
            health.suspended_until = self.clock() + self.config.probe_interval_s
            logger.warning("webhooks: %s suspended after %d dead letters in a row; its deliveries are parked, "
                           "probing every %gs", platform, health.dead_in_a_row, self.config.probe_interval_s)
        self._count_suspended()

    def _succeeded(self, platform: str) -> None:
        health = self.health[platform]
        if health.suspended_until is not None:
            logger.info("webhooks: %s answers again; deliveries resume (parked ones wait for `modpipe webhooks "
                        "replay %s`)", platform, platform)
        health.dead_in_a_row, health.suspended_until = 0, None
        self._count_suspended()

    def _count_suspended(self) -> None:
        metrics.webhook_suspended_platforms.set(sum(h.suspended_until is not None for h in self.health.values()))

    # -- Redis, waiting out outages -------------------------------------------------------------------------------

    async def _store_call(self, call: Callable[[], Awaitable[T]]) -> T:
        delay = 0.1
        while True:
            try:
                return await call()
            except StoreUnavailable as exc:
                logger.warning("webhooks: Redis unavailable (%s); waiting %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.settings.worker.outage_backoff_max_s)

    async def _refresh_hooks(self, force: bool = False) -> None:
        if not force and time.monotonic() - self._hooks_at < HOOKS_REFRESH_S:
            return
        try:
            self.hooks = await (self._store_call(self.registry.all) if force else self.registry.all())
            self._hooks_at = time.monotonic()
        except StoreUnavailable:
            logger.info("webhooks: registrations not refreshed (Redis unavailable); using the last ones")


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, deliverer: Deliverer) -> None:
        self.deliverer = deliverer

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.deliverer.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.deliverer.assigned.set()


async def replay(registry: WebhookRegistry, sender: Sender, key: str, platform: str,
                 limit: int | None = None) -> dict[str, Any]:
    """Send ``platform``'s dead letters in order, one attempt each, stopping at the first that fails (order)."""
    hook = await registry.get(platform)
    if hook is None:
        raise LookupError(f"no webhook registered for {platform!r}")
    delivered, error = 0, None
    while limit is None or delivered < limit:
        head = await registry.head(platform)
        if head is None:
            break
        raw, letter = head
        attempt = await sender.attempt(hook.url, hook.secret(key), letter.delivery, letter.attempts + 1)
        if not attempt.ok:
            error = attempt.error
            break
        await registry.delivered_head(platform, raw, letter.delivery.content_id)
        metrics.webhook_deliveries_total.labels("replayed").inc()
        delivered += 1
    counts = await registry.counts(platform)
    return {"platform": platform, "delivered": delivered, "remaining": counts["dead_letters"], "error": error}


async def run_until_signalled(deliverer: Deliverer) -> None:
    """Run the deliverer until SIGTERM or SIGINT (``modpipe webhooks deliver``)."""
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, deliverer.stop)
    await deliverer.run()
