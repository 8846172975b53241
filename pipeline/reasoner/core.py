"""Policy reasoning: ask gpt-oss-safeguard about one item against each applicable policy, escalating effort.

Why it is shaped like this:

* One call per policy (the cookbook: one policy per call beats many per call), all in flight at once but bounded
  by ``triton.max_in_flight`` through one semaphore shared by every ``judge`` of this worker.
* Nothing the model says is trusted blindly. Each answer is read in the policy's own answer format
  (:mod:`pipeline.reasoner.answers`) and checked (:mod:`pipeline.reasoner.assess`): the format, the probability of
  the verdict (token log-probabilities when the backend returns them, else the self-reported confidence), rule ids
  the policy does not define (hallucinated citations), cited rules whose label disagrees with the answer, and a
  contradiction of a confident triage score. An answer that fails any check, and every answer for a high-risk
  policy, is asked again at the escalated effort; what is still unsettled at the top effort goes to review. Every
  call records why it was not accepted.
* Every call carries an output budget per effort (``reasoner.max_tokens_*``) that fits the model's context with
  the prompt (:mod:`pipeline.reasoner.budget`: overlong content is cut by a documented rule, recorded on the call).
  An answer cut off at its budget (``finish_reason == "length"``) is never parsed as if whole: it is asked once
  more with ``truncation_retry_factor`` times the budget, then fails closed to review as ``truncated``. A policy
  whose declared answer format cannot be read fails closed at once (``unsupported_format``), without a model call.
* Tokens are counted per call (the backend's counts when it reports them) on every ReasonerCall and in
  ``modpipe_reasoner_tokens_total{direction,policy,effort}``.
* Several policies violated at once: the most severe policy leads the outcome (its rules first, its rationale
  first); a policy whose metadata says humans decide (``escalate_to_humans``) takes precedence over removal.
* Fail closed: a call that still fails after bounded retries is recorded with ``error`` set and the item goes to
  review (it stays hidden meanwhile). A circuit breaker stops hammering a reasoner that is down: while open, calls
  fail at once and items go straight to review.
* Repeated texts cost nothing: answers are cached in Redis by (normalised text hash, policy version, effort,
  model) and identical calls in flight are collapsed (:mod:`pipeline.reasoner.cache`).
* Two backends behind one interface (:class:`ReasonerBackend`): Triton's decoupled generate over gRPC
  ``stream_infer`` with harmony rendered here (how the vLLM backend serves gpt-oss-safeguard; the CPU stand-in
  speaks the same), and an OpenAI-compatible chat endpoint (:mod:`pipeline.reasoner.backends.openai`).

Content is untrusted and never logged above DEBUG. The chain of thought (analysis channel) is kept, size-capped,
on each ReasonerCall as reviewer evidence; it is never part of the rationale.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pipeline import metrics
from pipeline.config import ReasonerSettings, TritonSettings
from pipeline.errors import ModelOutputError, PolicyError, ReasonerTimeout, RetryableError
from pipeline.policies import Policy, PolicyLibrary
from pipeline.reasoner.assess import AssessmentBounds, assess
from pipeline.reasoner.backends import Completion, GenerateTransport, ReasonerBackend, UnreadableCompletion
from pipeline.reasoner.breaker import CircuitBreaker, CircuitOpen
from pipeline.reasoner.budget import MIN_CONTENT_TOKENS, CallPlan, plan_call
from pipeline.reasoner.cache import SingleFlight, VerdictCache, cache_key
from pipeline.reasoner.harmony import parse_answer
from pipeline.reasoner.logprobs import verdict_probability
from pipeline.retry import Backoff, with_retries
from pipeline.router import UNSETTLING, Assessment, ReasoningRoute, route_reasoning
from pipeline.schemas import (
    CallFailure,
    ContentItem,
    Effort,
    PolicyRef,
    ReasonerCall,
    ReviewReason,
    TriageScores,
)

if TYPE_CHECKING:
    from pipeline.config import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReasonerOutcome:
    route: ReasoningRoute  # ALLOW, BLOCK or REVIEW (never RETRY_HIGHER_EFFORT)
    review_reason: ReviewReason | None
    calls: list[ReasonerCall]  # every call made, in order, including failed, superseded and cached ones
    rule_ids: list[str]  # cited by the deciding calls, all defined by their policies, most severe policy first
    rationale: str
    policies: list[PolicyRef]
    effort: Effort  # the highest effort used
    model: str
    latency_ms: float
    efforts_used: list[Effort] = field(default_factory=list)  # distinct efforts, in the order used
    deciding_policy: str | None = None  # the most severe policy behind a BLOCK / POLICY_ESCALATE


def _cap(text: str, limit: int) -> str:
    """Keep the start and the end of a long chain of thought (where the reading and the conclusion are)."""
    if len(text) <= limit:
        return text
    if limit < 40:
        return text[:limit]
    head = limit * 2 // 3
    marker = f"\n[... {len(text) - limit} characters cut ...]\n"
    return text[:head] + marker + text[-(limit - head - len(marker)) :] if limit - head > len(marker) else text[:limit]


class SafeguardReasoner:
    """Judges items against policies with gpt-oss-safeguard (or its CPU stand-in), on Triton or a chat endpoint."""

    def __init__(
        self,
        triton: TritonSettings,
        reasoner: ReasonerSettings,
        library: PolicyLibrary,
        *,
        transport: GenerateTransport | None = None,
        backend: ReasonerBackend | None = None,
        cache: VerdictCache | None = None,
        breaker: CircuitBreaker | None = None,
    ):
        self._triton = triton
        self._settings = reasoner
        self._library = library
        if backend is None:
            from pipeline.reasoner.backends.triton import HarmonyBackend, TritonGrpcTransport

            backend = HarmonyBackend(transport or TritonGrpcTransport(triton), triton.reasoner_model,
                                     logprobs=reasoner.logprobs)
        self._backend: ReasonerBackend = backend
        self._check_budgets()
        self._cache = cache
        self._single_flight = SingleFlight()
        self._breaker = breaker or CircuitBreaker(reasoner.breaker_failures, reasoner.breaker_reset_s)
        self._in_flight = asyncio.Semaphore(triton.max_in_flight)
        self._backoff = Backoff(triton.backoff_initial_s, triton.backoff_max_s, jitter=True)
        self._bounds = AssessmentBounds(
            reasoner.min_confidence, reasoner.triage_confident_above, reasoner.triage_confident_below
        )

    def _check_budgets(self) -> None:
        """Every policy's prompt and every effort's budget leave room for content in the context (a configuration
        error at start, not a failure per call)."""
        for policy in self._library:
            self.check_policy(policy)

    def check_policy(self, policy: Policy) -> None:
        """PolicyError unless ``policy``'s prompt and each of its efforts' budgets leave room for content."""
        for effort in (policy.first_effort, policy.escalated_effort):
            room = (self._settings.max_model_len - self._backend.overhead_tokens(policy, effort)
                    - self._settings.max_tokens_for(effort))
            if room < MIN_CONTENT_TOKENS:
                raise PolicyError(
                    f"policy {policy.policy_id} {policy.version} at effort {effort.value}: its prompt and the output "
                    f"budget ({self._settings.max_tokens_for(effort)}) leave {room} of reasoner.max_model_len "
                    f"({self._settings.max_model_len}) tokens for content; raise max_model_len or lower the budget"
                )

    def overhead_tokens(self, policy: Policy, effort: Effort) -> int:
        """Prompt tokens of ``policy`` at ``effort`` before any content (what a call costs at least)."""
        return self._backend.overhead_tokens(policy, effort)

    @property
    def library(self) -> PolicyLibrary:
        """The policies (at their enforcing versions) :meth:`judge` reads."""
        return self._library

    def use_library(self, library: PolicyLibrary) -> None:
        """Judge with ``library`` from the next item on (a promotion or rollback the worker picked up). Every
        policy must fit the context (PolicyError otherwise, and the current library stays); an item being judged
        finishes with the library it started with, so no item is ever judged by no version or by two."""
        for policy in library:
            self.check_policy(policy)
        self._library = library

    @property
    def model(self) -> str:
        return self._backend.model

    @property
    def breaker(self) -> CircuitBreaker:
        return self._breaker

    async def start(self) -> None:
        await self._backend.start()

    async def close(self) -> None:
        await self._backend.close()
        if self._cache is not None:
            await self._cache.close()

    async def ready(self) -> bool:
        return await self._backend.ready()

    async def __aenter__(self) -> SafeguardReasoner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _complete_with_retries(
        self, policy: Policy, content: str, effort: Effort, request_id: str, max_tokens: int
    ) -> Completion:
        """Retry retryable failures with jittered bounded backoff, through the circuit breaker (an open breaker
        fails at once: retrying would only fail fast again)."""

        async def attempt(n: int) -> Completion:
            self._breaker.before_call()
            try:
                async with self._in_flight:
                    completion = await asyncio.wait_for(
                        self._backend.complete(policy, content, effort, f"{request_id}-a{n}", max_tokens=max_tokens),
                        timeout=self._triton.request_timeout_s,
                    )
            except (TimeoutError, asyncio.TimeoutError):
                self._breaker.record_failure()
                raise ReasonerTimeout(f"no answer within {self._triton.request_timeout_s}s") from None
            except RetryableError:
                self._breaker.record_failure()
                raise
            except ModelOutputError:
                self._breaker.record_success()  # the server answered: it is up
                raise
            self._breaker.record_success()
            return completion

        return await with_retries(
            attempt, stage="reasoning", attempts=self._triton.max_attempts, backoff=self._backoff,
            give_up=lambda error: isinstance(error, CircuitOpen),
        )

    def _plan(self, policy: Policy, content: str, effort: Effort) -> CallPlan:
        return plan_call(self._backend.overhead_tokens(policy, effort), content,
                         self._settings.max_tokens_for(effort), self._settings.max_model_len)

    async def call(self, item: ContentItem, policy: Policy, effort: Effort) -> ReasonerCall:
        """One policy, one effort: from the verdict cache, or a model call. Never raises for model, transport or
        cache failures (the ReasonerCall carries ``error``).

        Identical calls in flight are collapsed first, then the leader looks in the cache, so a duplicate is served
        either by the call already running or by the entry that call wrote before it finished: no race in between.
        """
        started = time.perf_counter()
        key = cache_key(item.text, policy.version, effort, self.model)

        async def lookup_or_call() -> ReasonerCall:
            if self._cache is not None and self._settings.cache_enabled:
                cached = await self._cache_get(key)
                if cached is not None:
                    logger.info("reasoner call %s:%s:%s served from the verdict cache",
                                item.content_id, policy.policy_id, effort.value)
                    return cached.model_copy(update={"cached": True, "escalation_reasons": []})
            return await self._call_model(item, policy, effort, key)

        result, shared = await self._single_flight.run(key, lookup_or_call)
        if shared:
            metrics.cache_lookup("reasoner_verdict", True)
        if shared or result.cached:
            return result.model_copy(update={"cached": True, "latency_ms": (time.perf_counter() - started) * 1000})
        return result

    async def _cache_get(self, key: str) -> ReasonerCall | None:
        try:
            hit = await self._cache.get(key)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001 -- the cache is an optimisation: any failure means "miss"
            logger.warning("verdict cache read failed (%s: %s); asking the model", type(exc).__name__, exc)
            metrics.cache_lookup("reasoner_verdict", False)
            return None
        metrics.cache_lookup("reasoner_verdict", hit is not None)
        return hit

    async def _call_model(self, item: ContentItem, policy: Policy, effort: Effort, key: str) -> ReasonerCall:
        started = time.perf_counter()
        request_id = f"{item.content_id}:{policy.policy_id}:{effort.value}:{uuid.uuid4().hex[:8]}"
        logger.debug("reasoner request %s: content=%r", request_id, item.text)
        base: dict = {"policy": policy.ref(), "model": self.model, "effort": effort}
        fmt = policy.answer_format
        if not fmt.supported:
            return ReasonerCall(**base, error=f"PolicyError: policy {policy.policy_id} declares answer format "
                                f"{fmt.kind!r}, which this reasoner cannot read (json, label, binary)",
                                failure=CallFailure.UNSUPPORTED_FORMAT, latency_ms=0.0)
        plan = self._plan(policy, item.text, effort)
        base["content_cut"] = plan.content_cut
        spent = {"input": 0, "output": 0}
        completion: Completion | None = None
        budget, retries = plan.max_tokens, 0
        try:
            completion = await self._complete_with_retries(policy, plan.content, effort, request_id, budget)
            self._spend(spent, policy, effort, completion)
            if _truncated(completion, budget):
                larger = min(int(budget * self._settings.truncation_retry_factor),
                             self._settings.max_model_len - (completion.prompt_tokens or plan.prompt_tokens))
                if larger > budget:
                    logger.info("reasoner call %s cut off at %d tokens; asking again with %d", request_id, budget,
                                larger)
                    budget, retries = larger, 1
                    completion = await self._complete_with_retries(policy, plan.content, effort,
                                                                   f"{request_id}-t1", budget)
                    self._spend(spent, policy, effort, completion)
            if _truncated(completion, budget):
                again = ", also after a retry with a larger budget" if retries else ""
                return self._failed(
                    base, started, effort, spent, completion, budget, retries, CallFailure.TRUNCATED,
                    f"TruncatedOutput: the answer was cut off at {budget} output tokens (finish_reason "
                    f"{completion.finish_reason or 'not reported'}{again})",
                )
            answer = parse_answer(completion.final, policy)
        except (RetryableError, ModelOutputError) as exc:
            logger.warning("reasoner call %s failed: %s: %s", request_id, type(exc).__name__, exc)
            if isinstance(exc, UnreadableCompletion):  # the server answered: what it spent still counts
                completion = exc.completion
                self._spend(spent, policy, effort, completion)
            name = "ModelOutputError" if isinstance(exc, UnreadableCompletion) else type(exc).__name__
            return self._failed(base, started, effort, spent, completion, budget, retries, _failure_kind(exc),
                                f"{name}: {exc}")
        latency = (time.perf_counter() - started) * 1000
        metrics.reasoner_latency_seconds.labels(self.model, effort.value, "ok").observe(latency / 1000)
        if answer.invalid_rule_ids:
            logger.info("reasoner call %s cited undefined rules %s", request_id, answer.invalid_rule_ids)
        probability = verdict_probability(completion.logprobs, completion.final, answer)
        logger.info(
            "reasoner call %s: violation=%s confidence=%s p=%s rules=%s tokens %s/%s in %.0f ms",
            request_id, answer.violation, answer.confidence, probability, answer.rule_ids, spent["input"],
            spent["output"], latency,
        )
        call = ReasonerCall(
            **base,
            violation=answer.violation,
            confidence=answer.confidence,
            rule_ids=answer.rule_ids,
            invalid_rule_ids=answer.invalid_rule_ids,
            rationale=answer.rationale[:1000],
            latency_ms=latency,
            policy_category=answer.policy_category,
            analysis=_cap(completion.analysis, self._settings.analysis_max_chars),
            output_errors=answer.output_errors,
            escalate=answer.escalate,
            verdict_probability=probability,
            **self._usage(spent, completion, budget, retries),
        )
        if self._cache is not None and self._settings.cache_enabled:
            try:
                await self._cache.put(key, call)
            except Exception as exc:  # noqa: BLE001 -- a failed cache write only costs a later model call
                logger.warning("verdict cache write failed (%s: %s)", type(exc).__name__, exc)
        return call

    @staticmethod
    def _spend(spent: dict[str, int], policy: Policy, effort: Effort, completion: Completion) -> None:
        metrics.reasoner_tokens(policy.policy_id, effort.value, completion.prompt_tokens, completion.completion_tokens)
        spent["input"] += completion.prompt_tokens or 0
        spent["output"] += completion.completion_tokens or 0

    @staticmethod
    def _usage(spent: dict[str, int], completion: Completion | None, budget: int, retries: int) -> dict:
        counted = completion is not None and (completion.prompt_tokens is not None
                                              or completion.completion_tokens is not None)
        return {
            "prompt_tokens": spent["input"] if counted else None,
            "completion_tokens": spent["output"] if counted else None,
            "tokens_from_backend": completion.tokens_from_backend if completion is not None else None,
            "max_tokens": budget,
            "finish_reason": completion.finish_reason if completion is not None else None,
            "truncation_retries": retries,
        }

    def _failed(self, base: dict, started: float, effort: Effort, spent: dict[str, int], completion: Completion | None,
                budget: int, retries: int, failure: CallFailure, error: str) -> ReasonerCall:
        latency = (time.perf_counter() - started) * 1000
        outcome = {CallFailure.UNAVAILABLE: "unavailable", CallFailure.TIMEOUT: "unavailable",
                   CallFailure.TRUNCATED: "truncated"}.get(failure, "invalid")
        metrics.reasoner_latency_seconds.labels(self.model, effort.value, outcome).observe(latency / 1000)
        analysis = _cap(completion.analysis, self._settings.analysis_max_chars) if completion is not None else ""
        return ReasonerCall(**base, error=error, failure=failure, latency_ms=latency, analysis=analysis,
                            **self._usage(spent, completion, budget, retries))

    # -- judging an item ----------------------------------------------------------------------------------------

    async def judge(
        self, item: ContentItem, policy_ids: list[str], triage: TriageScores | None = None
    ) -> ReasonerOutcome:
        """Judge ``item`` against ``policy_ids`` (empty: the default policies). PolicyError for unknown ids.

        ``triage`` (the escalation's scores) lets an answer that contradicts a confident triage score be checked
        again at the escalated effort.
        """
        library = self._library  # one snapshot per item: a swap meanwhile applies to the next item
        policies = [library.get(pid) for pid in dict.fromkeys(policy_ids or library.default_ids())]
        return await self.judge_policies(item, policies, triage)

    async def judge_policies(
        self, item: ContentItem, policies: list[Policy], triage: TriageScores | None = None
    ) -> ReasonerOutcome:
        """Judge ``item`` against exactly these policy versions, with the same effort escalation and checks as
        :meth:`judge`. How shadow judgements, backtests and retroaction ask about a version that is not (or not
        yet) the enforcing one; nothing here publishes anything, the caller decides what the outcome is for."""
        started = time.perf_counter()
        if not policies:
            raise PolicyError("no policy to judge against")
        by_id = {p.policy_id: p for p in policies}
        calls: list[ReasonerCall] = []
        latest: dict[str, tuple[ReasonerCall, Assessment]] = {}
        pending = {p.policy_id: p.first_effort for p in policies}
        efforts_used: list[Effort] = []
        while True:
            round_policies = [p for p in policies if p.policy_id in pending]
            results = await asyncio.gather(*(self.call(item, p, pending[p.policy_id]) for p in round_policies))
            for policy, result in zip(round_policies, results):
                effort = pending[policy.policy_id]
                efforts_used.append(effort)
                assessment = assess(result, policy, effort, triage, self._bounds)
                result = result.model_copy(update={"escalation_reasons": list(assessment.reasons)})
                calls.append(result)
                latest[policy.policy_id] = (result, assessment)
            decision = route_reasoning([latest[p.policy_id][1] for p in policies])
            if decision.route is not ReasoningRoute.RETRY_HIGHER_EFFORT:
                break
            pending = {pid: by_id[pid].escalated_effort for pid in decision.retry_policy_ids}
        current = [latest[p.policy_id][0] for p in policies]
        accepted_violation = [call for call, a in (latest[p.policy_id] for p in policies) if a.settled and a.violation]
        deciding = self._deciding_calls(decision.route, decision.review_reason, current, accepted_violation)
        deciding.sort(key=lambda c: (-by_id[c.policy.policy_id].severity_rank, c.policy.policy_id))
        rule_ids = list(dict.fromkeys(r for c in deciding for r in c.rule_ids))
        rationale = " | ".join(
            f"[{c.policy.policy_id} {c.policy.version}] " + (c.rationale if c.error is None else f"failed: {c.error}")
            + (f" (not accepted: {', '.join(c.escalation_reasons)})" if set(c.escalation_reasons) & UNSETTLING else "")
            for c in deciding
        )
        violated = [c for c in deciding if c in accepted_violation]
        outcome = ReasonerOutcome(
            route=decision.route,
            review_reason=decision.review_reason,
            calls=calls,
            rule_ids=rule_ids,
            rationale=rationale,
            policies=[p.ref() for p in policies],
            effort=max(efforts_used, key=lambda e: e.rank),
            model=self.model,
            latency_ms=(time.perf_counter() - started) * 1000,
            efforts_used=list(dict.fromkeys(efforts_used)),
            deciding_policy=violated[0].policy.policy_id if violated else None,
        )
        logger.info(
            "judged %s against %s: %s%s (%d calls, %d cached, efforts %s, %.0f ms)",
            item.content_id, [p.policy_id for p in policies], outcome.route.value,
            f"/{outcome.review_reason.value}" if outcome.review_reason else "", len(calls),
            sum(c.cached for c in calls), "/".join(e.value for e in outcome.efforts_used), outcome.latency_ms,
        )
        return outcome

    @staticmethod
    def _deciding_calls(
        route: ReasoningRoute, reason: ReviewReason | None, current: list[ReasonerCall], violated: list[ReasonerCall]
    ) -> list[ReasonerCall]:
        """The calls whose answers made the decision: their rule ids and rationale go into the outcome."""
        if route is ReasoningRoute.BLOCK or reason is ReviewReason.POLICY_ESCALATE:
            return list(violated)
        if route is ReasoningRoute.ALLOW:
            return list(current)
        return [c for c in current if set(c.escalation_reasons) & UNSETTLING]


def build_reasoner(settings: Settings, library: PolicyLibrary) -> SafeguardReasoner:
    """The reasoner the config asks for: Triton or OpenAI-compatible backend, with the Redis verdict cache."""
    from pipeline.reasoner.cache import RedisVerdictCache

    backend: ReasonerBackend
    if settings.reasoner.backend == "openai":
        from pipeline.reasoner.backends.openai import OpenAIChatBackend

        backend = OpenAIChatBackend(settings.reasoner, settings.triton.request_timeout_s)
    elif settings.reasoner.backend == "ollama":
        from pipeline.reasoner.backends.ollama import OllamaChatBackend

        backend = OllamaChatBackend(settings.reasoner, settings.triton.request_timeout_s)
    else:
        from pipeline.reasoner.backends.triton import HarmonyBackend, TritonGrpcTransport

        backend = HarmonyBackend(TritonGrpcTransport(settings.triton), settings.triton.reasoner_model,
                                 logprobs=settings.reasoner.logprobs)
    cache = (
        RedisVerdictCache(settings.redis, settings.reasoner.cache_ttl_s) if settings.reasoner.cache_enabled else None
    )
    return SafeguardReasoner(settings.triton, settings.reasoner, library, backend=backend, cache=cache)


def _truncated(completion: Completion, budget: int) -> bool:
    """Cut off at the budget: the server says so, or (a server that reports no finish reason) it used all of it."""
    if completion.finish_reason is not None:
        return completion.finish_reason == "length"
    return completion.completion_tokens is not None and completion.completion_tokens >= budget and not completion.final


def _failure_kind(exc: Exception) -> CallFailure:
    if isinstance(exc, ReasonerTimeout):
        return CallFailure.TIMEOUT
    if isinstance(exc, RetryableError):
        return CallFailure.UNAVAILABLE
    return CallFailure.INVALID_OUTPUT
