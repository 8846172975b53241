"""Live shadow judgements: a candidate version judged on items the reasoning role just judged for real.

Why it is shaped like this, so that shadowing can never starve enforcement:

* It runs *after* the item's enforced outcome is published, in background tasks of its own: the batch is
  acknowledged without waiting for it, and nothing a shadow judgement does (or fails to do) touches a verdict,
  visibility or a review task. It publishes :class:`~pipeline.schemas.ShadowResult` to ``moderation.shadow`` and
  nothing else.
* A budget of model calls per second (``lifecycle.shadow_calls_per_s``, a token bucket per worker) and a bound on
  judgements in flight (``lifecycle.shadow_max_in_flight``): an item that would exceed either is simply not
  shadowed (counted as ``skipped_budget`` / ``skipped_busy``); it never waits. The worker gives shadowing a
  reasoner of its own (:mod:`pipeline.lifecycle.wiring`), with that many in-flight slots and its own circuit
  breaker: a shadow call never holds a slot an enforcing call waits for. A version whose prompt does not fit the
  context is not shadowed at all (logged once). Calls served by the verdict cache
  cost nothing; a judgement that escalated to a second call pays for it afterwards (the bucket may go negative,
  which pauses shadowing until it refills), so the rate holds on average.
* Sampling is deterministic per (item revision, policy, version) (``lifecycle.shadow_sample``, or the share the
  registration asks for): a redelivered item makes the same choice, every worker agrees, and the items a candidate
  saw are a fair sample of the traffic that reaches the reasoner.

Which items: a candidate of policy P is judged on items whose escalation asked for P (so there is an enforced
answer to compare with); a policy with ``enforcing = false`` on items whose escalation would have asked for it had
it been enforcing (a default-scope policy: every escalated item; an on-request one: items that name it).
Shadowing sees only what reaches the reasoner; ``modpipe policy backtest`` replays everything through triage.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pipeline import metrics
from pipeline.config import LifecycleSettings
from pipeline.errors import PolicyError
from pipeline.lifecycle.compare import settled_answer
from pipeline.policies import Policy
from pipeline.router import ReasoningRoute
from pipeline.schemas import (
    CallFailure,
    ContentItem,
    Decision,
    Escalation,
    ReasonerCall,
    ShadowResult,
    TriageScores,
    Verdict,
)

if TYPE_CHECKING:
    from pipeline.effects import MessageSink
    from pipeline.lifecycle.live import LivePolicies, ShadowTarget
    from pipeline.reasoner.core import ReasonerOutcome

logger = logging.getLogger(__name__)


class VersionJudge(Protocol):
    """The reasoner as shadowing sees it (:meth:`pipeline.reasoner.SafeguardReasoner.judge_policies`)."""

    async def judge_policies(
        self, item: ContentItem, policies: list[Policy], triage: TriageScores | None = None
    ) -> ReasonerOutcome: ...


def sampled(content_id: str, revision: int, policy_id: str, version: str, share: float) -> bool:
    """Whether this item revision is in the ``share`` of items a version is shadowed on (deterministic)."""
    if share >= 1.0:
        return True
    if share <= 0.0:
        return False
    digest = hashlib.sha256(f"{content_id}|{revision}|{policy_id}|{version}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < share


def shadow_id(content_id: str, revision: int, policy_id: str, version: str) -> str:
    return hashlib.sha256(f"shadow|{content_id}|{revision}|{policy_id}|{version}".encode()).hexdigest()[:32]


def model_calls(calls: list[ReasonerCall]) -> int:
    """Calls that reached the model (not served by the verdict cache, not refused before sending)."""
    return sum(1 for c in calls if not c.cached and c.failure is not CallFailure.UNSUPPORTED_FORMAT)


def outcome_decision(route: ReasoningRoute) -> Decision | None:
    return {ReasoningRoute.ALLOW: Decision.ALLOW, ReasoningRoute.BLOCK: Decision.BLOCK}.get(route)


class TokenBucket:
    """``rate`` tokens per second, at most ``max(1, rate)`` saved up; ``take`` needs a positive balance."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = max(1.0, rate)
        self._clock = clock
        self._tokens = self.capacity
        self._at = clock()

    def _fill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.rate)
        self._at = now

    @property
    def tokens(self) -> float:
        self._fill()
        return self._tokens

    def take(self, n: float) -> bool:
        """Spend ``n`` tokens if at least one is there (the balance may go below zero by the rest)."""
        if self.rate <= 0:
            return False
        self._fill()
        if self._tokens < 1.0:
            return False
        self._tokens -= n
        return True

    def debit(self, n: float) -> None:
        """Spend (or, negative, give back) ``n`` more tokens after the fact."""
        self._fill()
        self._tokens = min(self.capacity, self._tokens - n)


class ShadowRunner:
    """Offers each judged item to the shadow targets of a :class:`~pipeline.lifecycle.live.LivePolicies`."""

    def __init__(self, judge: VersionJudge, live: LivePolicies, sink: MessageSink, topic: str,
                 lifecycle: LifecycleSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.judge = judge
        self.live = live
        self.sink = sink
        self.topic = topic
        self.max_in_flight = lifecycle.shadow_max_in_flight
        self.bucket = TokenBucket(lifecycle.shadow_calls_per_s, clock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._fits: dict[tuple[str, str], bool] = {}  # version -> its prompt fits the reasoner's context

    def _fits_context(self, policy: Policy) -> bool:
        key = (policy.policy_id, policy.version)
        if key not in self._fits:
            check = getattr(self.judge, "check_policy", None)
            try:
                if check is not None:
                    check(policy)
                self._fits[key] = True
            except PolicyError as exc:
                logger.error("shadow: %s %s is not judged: %s", policy.policy_id, policy.version, exc)
                self._fits[key] = False
        return self._fits[key]

    @staticmethod
    def eligible(target: ShadowTarget, escalation: Escalation) -> bool:
        if target.candidate_of is not None:
            return target.candidate_of in escalation.policy_ids
        policy = target.policy
        return policy.scope == "default" or policy.policy_id in (escalation.item.policy_ids or [])

    def offer(self, escalation: Escalation, outcome: ReasonerOutcome, verdict: Verdict | None) -> int:
        """Start the shadow judgements this item is chosen for; returns how many started. Never raises, never
        waits: what the budget or the in-flight bound does not allow is skipped."""
        started = 0
        item = escalation.item
        for target in self.live.shadow_targets:
            policy = target.policy
            if not self.eligible(target, escalation) or not sampled(
                    item.content_id, escalation.revision, policy.policy_id, policy.version, target.sample) \
                    or not self._fits_context(policy):
                continue
            if len(self._tasks) >= self.max_in_flight:
                metrics.shadow_judgements_total.labels(policy.policy_id, "skipped_busy").inc()
                continue
            reserved = 2 if policy.high_risk else 1  # a high-risk policy is always asked twice
            if not self.bucket.take(reserved):
                metrics.shadow_judgements_total.labels(policy.policy_id, "skipped_budget").inc()
                continue
            task = asyncio.create_task(self._run(target, escalation, outcome, verdict, reserved),
                                       name=f"shadow-{policy.policy_id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            started += 1
        return started

    async def _run(self, target: ShadowTarget, escalation: Escalation, outcome: ReasonerOutcome,
                   verdict: Verdict | None, reserved: int) -> None:
        policy = target.policy
        item = escalation.item
        begun = time.perf_counter()
        try:
            result = await self.judge.judge_policies(item, [policy], triage=escalation.triage)
            spent = model_calls(result.calls)
            self.bucket.debit(spent - reserved)
            metrics.shadow_model_calls_total.labels(policy.policy_id).inc(spent)
            violation, rules = settled_answer(result.calls, policy.policy_id)
            enforced, enforced_rules = (settled_answer(outcome.calls, policy.policy_id) if target.candidate_of
                                        else (None, ()))
            enforced_ref = next((p for p in outcome.policies if p.policy_id == policy.policy_id), None)
            shadow = ShadowResult(
                shadow_id=shadow_id(item.content_id, escalation.revision, policy.policy_id, policy.version),
                content_id=item.content_id, revision=escalation.revision, platform=item.platform,
                policy=policy.ref(), enforced_policy=enforced_ref if target.candidate_of else None,
                decision=outcome_decision(result.route), review_reason=result.review_reason,
                violation=violation, rule_ids=list(rules) or result.rule_ids,
                rationale=result.rationale, reasoner_calls=result.calls, triage=escalation.triage,
                enforced_decision=verdict.decision if verdict is not None else None,
                enforced_violation=enforced, enforced_rule_ids=list(enforced_rules),
                verdict_id=verdict.verdict_id if verdict is not None else None,
                latency_ms=(time.perf_counter() - begun) * 1000,
            )
            await self.sink.send(self.topic, item.content_id, shadow.to_bytes())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a shadow judgement must never disturb the worker
            metrics.shadow_judgements_total.labels(policy.policy_id, "failed").inc()
            logger.warning("shadow judgement of %s r%d under %s %s failed: %s: %s", item.content_id,
                           escalation.revision, policy.policy_id, policy.version, type(exc).__name__, exc)
            return
        against = shadow.enforced_violation if target.candidate_of else (
            None if verdict is None else verdict.decision is Decision.BLOCK)
        label = "unsettled" if shadow.violation is None else (
            "agree" if against is None or shadow.violation == against else "flip")
        metrics.shadow_judgements_total.labels(policy.policy_id, label).inc()
        logger.info("shadow: %s r%d under %s %s: %s", item.content_id, escalation.revision, policy.policy_id,
                    policy.version, label)

    async def drain(self, timeout_s: float = 30.0) -> None:
        """Wait for the judgements in flight (tests, and shutdown: what is unfinished then is cancelled)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    async def close(self, timeout_s: float = 5.0) -> None:
        await self.drain(timeout_s)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
