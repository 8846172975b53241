"""The review service's domain: claims, decisions, escalations, appeals, visibility and the audit relay.

HTTP-free, so the web API, the CLI and the tests share one implementation. A decision goes through the effect
ledger like every other verdict (:class:`~pipeline.effects.Effects`): first record wins, publish the stored
payload, mark it published. A first review records in the item revision's slot (:func:`~pipeline.store.item_effect`,
so a reviewer and a late reasoner can never both publish a final verdict for one revision); the outcome of the n-th
appeal records in its own slot (:func:`~pipeline.store.appeal_effect`) with ``supersedes`` set, and moves visibility
only over the verdict it supersedes. Every decision names the revision it judged.

Each action is appended to the audit log in the same atomic step as the state change; :mod:`pipeline.review.relay`
publishes it to ``moderation.decisions``. The service does not consume Kafka: the ``review-intake`` worker fills the queues from ``moderation.review``.

Who may see what (least privilege): reviewers and admins read every item's visibility, the queues and the stats;
a platform reads and appeals only the items whose latest verdict names its platform (``Verdict.platform``, copied
from ``ContentItem.platform``). An item of no platform belongs to none: only reviewers and admins see it. A
platform asking about another platform's item gets the very answer it gets for an unknown item.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from pipeline import metrics
from pipeline.config import Settings
from pipeline.errors import PolicyError
from pipeline.broker import Publisher
from pipeline.effects import Effects, since_ingest_ms
from pipeline.policies import PolicyLibrary
from pipeline.review.auth import Principal, Role, TokenStore
from pipeline.review.feedback import (
    compute_stats,
    feedback_example,
    latest_decisions,
    load_category_policies,
    machine_view,
    model_answers,
)
from pipeline.review.errors import Conflict, Forbidden, Invalid, NotFound
from pipeline.review.queue import Outcome, ReviewQueue, severities_from
from pipeline.review.relay import AuditRelay, pause
from pipeline.schemas import (
    AppealRequest,
    Decision,
    Latency,
    ReviewAction,
    ReviewDecision,
    ReviewReason,
    ReviewTask,
    Stage,
    TriageScores,
    Verdict,
    VerdictStatus,
    parse_wire,
    utcnow,
)
from pipeline.store import EffectKind, RedisStore, Visibility, appeal_effect, redis_client

logger = logging.getLogger(__name__)

DECISIONS = {"allow": Decision.ALLOW, "remove": Decision.BLOCK}


class ReviewService:
    """One per process; ``start`` opens Redis and Kafka and the background relay, ``stop`` closes them."""

    def __init__(self, settings: Settings, *, library: PolicyLibrary | None = None, relay_interval_s: float = 0.2,
                 instance_id: str | None = None) -> None:
        self.settings = settings
        self.library = library or PolicyLibrary.from_settings(settings.reasoner, strict=False)
        # Without a library given, reviewers see and cite the versions the registry says enforce (start()).
        self._follow_registry = library is None
        self._closers: list[Callable[[], Awaitable[object]]] = []
        self.store = RedisStore(settings.redis, client=redis_client(settings.redis, max_connections=64))
        # The Kafka producer needs a running event loop: it is made in start().
        self.publisher: Publisher = None  # type: ignore[assignment]
        self.effects: Effects = None  # type: ignore[assignment]
        self.queue = ReviewQueue(self.store, severities_from(self.library))
        admin = settings.review.admin_token.get_secret_value() if settings.review.admin_token else None
        self.tokens = TokenStore(self.store, admin)
        self.decisions_topic = settings.kafka.topic(settings.kafka.decisions_topic)
        self.category_policies = load_category_policies(settings.triage.model_dir)
        self._relay_interval_s = relay_interval_s
        self._instance = instance_id or uuid.uuid4().hex
        self.relay: AuditRelay = None  # type: ignore[assignment]  # needs the publisher: made in start()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()

    async def start(self, background: bool = True) -> None:
        self._stopping.clear()
        await self.store.ping()
        self.publisher = Publisher(self.settings.kafka)
        self.effects = Effects(self.settings.kafka, self.store, self.publisher)
        self.relay = AuditRelay(self.store, self.queue, self.publisher, self.decisions_topic, self._instance)
        await self.publisher.start()
        if self._follow_registry:
            from pipeline.lifecycle.wiring import live_policies

            live = await live_policies(self.settings, self.store, "review", self._closers, strict=False, start=False)
            self.library = live.library
            live.subscribe(self._use_library)
            live.start()
        if background:
            self._tasks.append(asyncio.create_task(self.relay.run(self._stopping, self._relay_interval_s),
                                                   name="review-audit-relay"))
            self._tasks.append(asyncio.create_task(self._upkeep_loop(), name="review-upkeep"))

    def _use_library(self, library: PolicyLibrary) -> None:
        """A promotion or rollback: show and check the version that enforces now (queued tasks keep the policy
        ids they were queued under; only the text and rules shown and the rule check follow the swap)."""
        self.library = library

    async def stop(self) -> None:
        # A flag, not only cancel(): a cancellation that lands inside a client library can be swallowed there.
        self._stopping.set()
        for close in reversed(self._closers):
            await close()
        self._closers.clear()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=5.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=2.0)
        self._tasks.clear()
        try:
            await self.relay.relay_once()  # flush the audit log before going
        except Exception:  # noqa: BLE001 - best effort; the next instance relays what is left
            logger.warning("review: final audit relay failed; the next instance will relay the rest")
        await self.publisher.stop()
        await self.store.close()

    # -- queues and items ---------------------------------------------------------------------------------------

    async def queues(self, principal: Principal) -> dict[str, Any]:
        """The queue counts, for reviewers and admins."""
        self._require_reviewer(principal)
        return await self.queue_counts()

    async def queue_counts(self) -> dict[str, Any]:
        counts, claimed = await self.queue.counts()
        return {
            "queues": [
                {"queue": c.queue, "severity": c.severity or None, "policy_id": c.policy_id or None,
                 "pending": c.pending, "oldest_age_s": round(c.oldest_age_s, 1) if c.oldest_age_s is not None else None}
                for c in counts
            ],
            "pending": sum(c.pending for c in counts),
            "claimed": claimed,
        }

    async def claim(self, principal: Principal, policy_id: str | None = None) -> dict[str, Any] | None:
        self._require_reviewer(principal)
        started = time.perf_counter()
        claim = await self.queue.claim(principal.principal_id, self.settings.review.claim_ttl_s,
                                       admin=principal.is_admin, policy_id=policy_id)
        metrics_observe_claim(time.perf_counter() - started, claim is not None)
        if claim is None:
            return None
        logger.info("review: %s claimed %s until %.0f", principal.principal_id, claim.content_id, claim.lease_until)
        return await self.item_view(principal, claim.content_id)

    async def _held_state(self, principal: Principal, content_id: str):  # type: ignore[no-untyped-def]
        state = await self.queue.get(content_id)
        if state is None:
            raise NotFound(f"no review task for {content_id}")
        if principal.is_admin:
            return state
        if state.state != "claimed" or state.holder != principal.principal_id or (state.lease_until or 0) <= time.time():
            raise Conflict(f"{content_id} is not held by {principal.principal_id}")
        return state

    async def item_view(self, principal: Principal, content_id: str) -> dict[str, Any]:
        """Everything a reviewer needs except the content text (revealed on demand by :meth:`content`)."""
        self._require_reviewer(principal)
        state = await self._held_state(principal, content_id)
        task = state.task
        cited: dict[str, set[str]] = {}
        for call in task.reasoner_calls:
            cited.setdefault(call.policy.policy_id, set()).update(call.rule_ids)
        policies = []
        for pid in task.policy_ids:
            try:
                policy = self.library.get(pid)
            except PolicyError:
                policies.append({"policy_id": pid, "missing": True})
                continue
            policies.append({
                "policy_id": pid, "name": policy.name, "version": policy.version, "severity": policy.severity,
                "text": policy.text,
                "rules": [{"rule_id": r.rule_id, "label": r.label, "text": r.text,
                           "cited": r.rule_id in cited.get(pid, set())} for r in policy.rules],
                "cited_rule_ids": sorted(cited.get(pid, set())),
            })
        superseded = None
        if state.supersedes:
            vis = await self.store.visibility(content_id)
            if vis.verdict is not None and vis.verdict.verdict_id == state.supersedes:
                superseded = vis.verdict.model_dump(mode="json")
        return {
            "content_id": content_id,
            "task_id": task.task_id,
            "reason": task.reason.value,
            "state": state.state,
            "queue": state.queue,
            "holder": state.holder,
            "lease_until": state.lease_until,
            "revision": task.revision,
            "appeal_round": state.round,
            "supersedes": superseded,
            "history": [e.model_dump(mode="json") for e in await self.queue.history(content_id)],
            "ingested_at": task.ingested_at.isoformat(),
            "queued_at": task.created_at.isoformat(),
            "age_s": round(time.time() - task.ingested_at.timestamp(), 1),
            "item": {"author_id": task.item.author_id, "platform": task.item.platform,
                     "language": task.item.language, "chars": len(task.item.text)},
            "triage": task.triage.model_dump(mode="json"),
            "policies": policies,
            "model": {
                "generated_by_model": True,
                "calls": [c.model_dump(mode="json") for c in task.reasoner_calls],
            },
        }

    async def content(self, principal: Principal, content_id: str) -> str:
        """The item's text, for the holder (or an admin). Never logged."""
        self._require_reviewer(principal)
        state = await self._held_state(principal, content_id)
        logger.info("review: %s revealed the content of %s", principal.principal_id, content_id)
        return state.task.item.text

    def policy_catalogue(self) -> list[dict[str, Any]]:
        return [
            {"policy_id": p.policy_id, "name": p.name, "severity": p.severity, "enforcing": p.enforcing,
             "rules": [{"rule_id": r.rule_id, "label": r.label, "text": r.text} for r in p.rules]}
            for p in self.library
        ]

    # -- actions ------------------------------------------------------------------------------------------------

    def _check_rule(self, decision: Decision, policy_id: str, rule_id: str | None) -> None:
        try:
            policy = self.library.get(policy_id)
        except PolicyError as exc:
            raise Invalid(str(exc)) from None
        if rule_id is None:
            if decision is Decision.BLOCK:
                raise Invalid("a removal must cite the rule it breaks")
            return
        rule = policy.rule(rule_id)
        if rule is None:
            raise Invalid(f"rule {rule_id!r} is not defined by policy {policy_id!r}")
        if decision is Decision.BLOCK and rule.label != 1:
            raise Invalid(f"rule {rule_id} is a SAFE rule; a removal cites a VIOLATES rule")
        if decision is Decision.ALLOW and rule.label != 0:
            raise Invalid(f"rule {rule_id} is a VIOLATES rule; an allow cites a SAFE rule or none")

    async def decide(self, principal: Principal, content_id: str, decision: str, policy_id: str,
                     rule_id: str | None = None, note: str = "", revision: int | None = None) -> Verdict:
        """Publish the final verdict for an item the caller holds; a retried request gets the same verdict.

        ``revision`` (what the reviewer saw) must be the revision under review: an edit since is a 409."""
        self._require_reviewer(principal)
        if decision not in DECISIONS:
            raise Invalid(f"decision must be one of {sorted(DECISIONS)}")
        chosen = DECISIONS[decision]
        self._check_rule(chosen, policy_id, rule_id or None)
        state = await self.queue.get(content_id)
        if state is None:
            raise NotFound(f"no review task for {content_id}")
        task = state.task
        if revision is not None and revision != task.revision:
            raise Conflict(f"{content_id} was edited: revision {task.revision} is under review, not {revision}",
                           revision=task.revision)
        vis = await self.store.visibility(content_id)
        superseded = vis.verdict if state.supersedes and vis.verdict and vis.verdict.verdict_id == state.supersedes else None
        machine_violation, machine_source = machine_view(task, superseded)
        refs = []
        for pid in dict.fromkeys([*task.policy_ids, policy_id]):
            try:
                refs.append(self.library.get(pid).ref())
            except PolicyError:
                continue
        rationale = f"human review: {decision} under {policy_id}" + (f" ({rule_id})" if rule_id else "")
        supersedes = state.supersedes or await self.effects.superseded(content_id, task.revision)
        verdict = Verdict.final(
            content_id, chosen, Stage.REVIEW, revision=task.revision, platform=task.item.platform,
            triage=task.triage,
            policies=refs,
            reasoner_calls=task.reasoner_calls,
            rule_ids=[rule_id] if rule_id else [],
            rationale=rationale + (f": {note}" if note else ""),
            reviewer_id=principal.principal_id,
            supersedes=supersedes,
            latency=Latency(
                triage_ms=task.triage.latency_ms,
                reasoner_ms=sum(c.latency_ms for c in task.reasoner_calls) or None,
                since_ingest_ms=since_ingest_ms(task.ingested_at),
            ),
        )
        entry = ReviewDecision(
            decision_id=uuid.uuid4().hex, content_id=content_id, task_id=task.task_id, action=ReviewAction.DECIDE,
            actor_id=principal.principal_id, actor_role=principal.role.value, decision=chosen, policy_id=policy_id,
            rule_id=rule_id, note=note, verdict_id=verdict.verdict_id, supersedes=supersedes,
            appeal_round=state.round, revision=task.revision, model_violation=machine_violation, model_source=machine_source,
            model_answers=model_answers(task),
        )
        outcome, payload, done = await self.queue.record_decision(
            content_id, principal.principal_id, verdict.model_dump_json(), entry
        )
        if outcome is Outcome.MISSING:
            raise NotFound(f"no review task for {content_id}")
        if outcome in (Outcome.NOT_HELD, Outcome.EXPIRED, Outcome.DECIDED):
            metrics_count_action("decide", outcome.value)
            raise Conflict(f"{content_id} is not held by {principal.principal_id} ({outcome.value})")
        assert payload is not None
        stored = parse_wire(Verdict, payload)
        if not done:
            published = await self._publish_decision(stored, state.round)
            if published.verdict_id != stored.verdict_id:
                raise Conflict(f"{content_id} already has a final verdict", verdict=published.model_dump(mode="json"))
        if outcome is Outcome.OK:
            metrics_count_action("decide", "ok")
            if vis.state is Visibility.HIDDEN_PENDING and vis.verdict is not None and state.round == 0:
                hidden_s = (stored.decided_at - vis.verdict.decided_at).total_seconds()
                metrics.time_hidden_seconds.labels(Stage.REVIEW.value).observe(max(0.0, hidden_s))
        logger.info("review: %s decided %s: %s under %s (round %d, verdict %s)", principal.principal_id, content_id,
                 decision, policy_id, state.round, stored.verdict_id)
        return stored

    async def _publish_decision(self, verdict: Verdict, round_: int) -> Verdict:
        """Record, publish and apply a decided verdict; returns the verdict that stands (normally this one)."""
        cid = verdict.content_id
        if round_ == 0:
            standing = await self.effects.verdict(verdict)
            if standing.verdict_id != verdict.verdict_id:
                logger.warning("review: %s r%d was decided by %s before the reviewer; their decision is void",
                               cid, verdict.revision, standing.stage.value)
        else:
            effect_id = appeal_effect(cid, verdict.revision, round_)
            await self.effects.emit(EffectKind.FINAL, effect_id, cid, verdict.to_bytes())
            recorded = await self.store.recorded(EffectKind.FINAL, effect_id)
            standing = parse_wire(Verdict, recorded.payload) if recorded else verdict
            if standing.supersedes:
                await self.store.visibility_after_appeal(cid, standing, standing.supersedes)
        if standing.verdict_id == verdict.verdict_id:
            metrics.verdicts_total.labels(Stage.REVIEW.value, VerdictStatus.FINAL.value, verdict.decision.value).inc()
        await self.queue.mark_done(cid, self.settings.redis.verdict_ttl_s)
        return standing

    async def skip(self, principal: Principal, content_id: str) -> None:
        self._require_reviewer(principal)
        outcome = await self.queue.skip(content_id, principal.principal_id)
        metrics_count_action("skip", outcome.value)
        self._raise_for(outcome, principal, content_id)

    async def release(self, principal: Principal, content_id: str) -> None:
        self._require_reviewer(principal)
        self._raise_for(await self.queue.release(content_id, principal.principal_id), principal, content_id)

    async def escalate(self, principal: Principal, content_id: str, note: str = "") -> None:
        self._require_reviewer(principal)
        state = await self.queue.get(content_id)
        if state is None:
            raise NotFound(f"no review task for {content_id}")
        entry = ReviewDecision(
            decision_id=uuid.uuid4().hex, content_id=content_id, task_id=state.task.task_id,
            action=ReviewAction.ESCALATE, actor_id=principal.principal_id, actor_role=principal.role.value,
            note=note, appeal_round=state.round,
        )
        outcome = await self.queue.escalate(content_id, principal.principal_id, entry)
        metrics_count_action("escalate", outcome.value)
        self._raise_for(outcome, principal, content_id)
        logger.info("review: %s escalated %s to the admin queue", principal.principal_id, content_id)

    def _raise_for(self, outcome: Outcome, principal: Principal, content_id: str) -> None:
        if outcome is Outcome.MISSING:
            raise NotFound(f"no review task for {content_id}")
        if outcome is not Outcome.OK:
            raise Conflict(f"{content_id} is not held by {principal.principal_id} ({outcome.value})")

    async def appeal(self, principal: Principal, request: AppealRequest) -> dict[str, Any]:
        """Re-queue a decided item, with its history, for a reviewer other than the one who decided it."""
        if principal.role.value not in ("admin", "platform"):
            raise Forbidden("appeals are filed by a platform or an admin")
        cid = request.content_id
        item = request.item
        if item is not None and item.content_id != cid:
            raise _field_invalid("body.item.content_id", "does not match content_id")
        limit = self.settings.triage.max_text_chars
        if item is not None and len(item.text) > limit:
            raise _field_invalid("body.item.text", f"{len(item.text)} characters, over the {limit}-character limit")
        vis = await self.store.visibility(cid)
        foreign = principal.role is Role.PLATFORM and not principal.owns(vis.verdict.platform if vis.verdict else None)
        if not vis.final or vis.verdict is None or foreign:
            raise Conflict(f"{cid} has no final verdict to appeal")  # the same for another platform's item
        current = vis.verdict
        task = None
        if item is not None:
            if item.platform is None:
                item = item.model_copy(update={"platform": current.platform})
            elif item.platform != current.platform:
                raise _field_invalid("body.item.platform", "must be the platform of the verdict appealed")
            policy_ids = [p.policy_id for p in current.policies] or item.policy_ids or self.library.default_ids()
            task = ReviewTask(
                task_id=uuid.uuid4().hex, item=item,
                triage=current.triage or TriageScores(model_version="none", violation=0.0, latency_ms=0.0),
                reason=ReviewReason.APPEAL, policy_ids=policy_ids, reasoner_calls=current.reasoner_calls,
                ingested_at=utcnow(), revision=current.revision,
            )
        entry = ReviewDecision(
            decision_id=uuid.uuid4().hex, content_id=cid, task_id=task.task_id if task else "stored",
            action=ReviewAction.APPEAL, actor_id=principal.principal_id, actor_role=principal.role.value,
            note=request.reason, supersedes=current.verdict_id, revision=current.revision,
            model_violation=current.decision is Decision.BLOCK, model_source=current.stage.value,
        )
        outcome, round_ = await self.queue.appeal(
            cid, task=task, exclude=current.reviewer_id if current.stage is Stage.REVIEW else None,
            supersedes=current.verdict_id, entry=entry, revision=current.revision,
        )
        metrics_count_action("appeal", outcome)
        if outcome == "open":
            raise Conflict(f"{cid} is already under review")
        if outcome == "busy":
            raise Conflict(f"{cid}'s last decision is still being published; retry shortly")
        if outcome == "no_item":
            raise Invalid(f"the pipeline keeps no copy of {cid}: send the item with the appeal")
        logger.info("review: %s appealed %s (round %d, supersedes %s)", principal.principal_id, cid, round_,
                 current.verdict_id)
        return {"content_id": cid, "revision": current.revision, "appeal_round": round_,
                "supersedes": current.verdict_id, "excluded_reviewer": current.reviewer_id if current.stage is Stage.REVIEW else None}

    # -- platforms, stats, feedback -------------------------------------------------------------------------------

    async def visibility(self, principal: Principal, content_id: str) -> dict[str, Any]:
        """Whether an item may be shown; a platform sees its own items only (another's reads as unknown)."""
        record = await self.store.visibility(content_id)
        platform = record.verdict.platform if record.verdict else None
        if record.state is Visibility.UNKNOWN or (principal.role is Role.PLATFORM and not principal.owns(platform)):
            raise NotFound(f"{content_id} is unknown to the pipeline", state="UNKNOWN")
        body: dict[str, Any] = {
            "content_id": content_id,
            "state": record.state.name,
            "final": record.final,
            "revision": record.revision,
            "verdict": record.verdict.model_dump(mode="json") if record.verdict else None,
        }
        if record.state is Visibility.HIDDEN_PENDING and record.verdict is not None:
            body["hidden_for_s"] = round((utcnow() - record.verdict.decided_at).total_seconds(), 3)
        return body

    async def stats(self, principal: Principal) -> dict[str, Any]:
        self._require_reviewer(principal)
        stats = compute_stats(await self.queue.log_entries())
        stats["queues"] = await self.queue_counts()
        return stats

    async def export_examples(self) -> AsyncIterator[dict[str, Any]]:
        """Labelled examples, one per decided item (its latest decision), in the agreed feedback format."""
        for cid, entry in latest_decisions(await self.queue.log_entries()).items():
            state = await self.queue.get(cid)
            if state is None:
                continue  # the task expired (older than the replay window)
            yield feedback_example(entry, state.task, self.category_policies)

    def _require_reviewer(self, principal: Principal) -> None:
        if not principal.can_review:
            raise Forbidden(f"role {principal.role.value} cannot review")

    # -- background: audit relay and recovery ---------------------------------------------------------------------

    async def finish_undone(self, min_age_s: float = 5.0) -> int:
        """Publish decisions that a crash left recorded but unpublished (the ledger makes this idempotent)."""
        finished = 0
        for cid in await self.queue.undone():
            state = await self.queue.get(cid)
            if state is None or state.verdict_json is None:
                continue
            verdict = parse_wire(Verdict, state.verdict_json)
            if (utcnow() - verdict.decided_at).total_seconds() < min_age_s:
                continue  # probably still being published by the request that decided it
            await self._publish_decision(verdict, state.round)
            finished += 1
        return finished

    async def _upkeep_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.finish_undone()
                counts, _ = await self.queue.counts()
                now = time.time()
                oldest = [now - c.oldest_age_s for c in counts if c.oldest_age_s is not None]
                metrics.set_review_queue(sum(c.pending for c in counts), min(oldest) if oldest else None, now)
            except Exception:  # noqa: BLE001 - keep trying; requests do not depend on this loop
                logger.warning("review: upkeep failed; retrying", exc_info=True)
            await pause(self._stopping, 5.0)


def _field_invalid(field: str, problem: str) -> Invalid:
    """A 422 shaped like a validation error of the request body (pipeline.http.errors), naming the field."""
    return Invalid(f"invalid request: {field}: {problem}", fields=[{"field": field, "problem": problem}])


def metrics_observe_claim(seconds: float, got: bool) -> None:
    metrics.review_claim_seconds.labels("item" if got else "empty").observe(seconds)


def metrics_count_action(action: str, outcome: str) -> None:
    metrics.review_actions_total.labels(action, outcome).inc()
