"""Policy reasoning: ask gpt-oss-safeguard about one item against each applicable policy, escalating effort.

Why it is shaped like this:

* One call per policy (the cookbook: one policy per call beats many per call), all in flight at once but bounded
  by ``triton.max_in_flight`` through one semaphore shared by every ``judge`` of this worker.
* Nothing the model says is trusted blindly. Each answer is checked (:meth:`SafeguardReasoner.assess`): the strict
  answer schema, the self-reported confidence, rule ids the policy does not define (hallucinated citations),
  cited rules whose label disagrees with the answer, and a contradiction of a confident triage score. An answer
  that fails any check, and every answer for a high-risk policy, is asked again at the escalated effort; what is
  still unsettled at the top effort goes to review. Every call records why it was not accepted.
* Several policies violated at once: the most severe policy leads the outcome (its rules first, its rationale
  first); a policy whose metadata says humans decide (``escalate_to_humans``) takes precedence over removal.
* Fail closed: a call that still fails after bounded retries is recorded with ``error`` set and the item goes to
  review (it stays hidden meanwhile). A circuit breaker stops hammering a reasoner that is down: while open, calls
  fail at once and items go straight to review.
* Repeated texts cost nothing: answers are cached in Redis by (normalised text hash, policy version, effort,
  model) and identical calls in flight are collapsed (:mod:`pipeline.reasoner_cache`).
* Two backends behind one interface (:class:`ReasonerBackend`): Triton's decoupled generate over gRPC
  ``stream_infer`` with harmony rendered here (how the vLLM backend serves gpt-oss-safeguard; the CPU stand-in
  speaks the same), and an OpenAI-compatible chat endpoint (:mod:`pipeline.openai_backend`).

Content is untrusted and never logged above DEBUG. The chain of thought (analysis channel) is kept, size-capped,
on each ReasonerCall as reviewer evidence; it is never part of the rationale.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import grpc
import numpy as np

from pipeline import metrics
from pipeline.config import ReasonerSettings, TritonSettings
from pipeline.errors import ModelOutputError, PolicyError, ReasonerTimeout, ReasonerUnavailable, RetryableError
from pipeline.harmony import parse_answer, parse_completion, render_prompt
from pipeline.policies import Policy, PolicyLibrary
from pipeline.reasoner_cache import SingleFlight, VerdictCache, cache_key
from pipeline.router import ReasoningRoute, route_reasoning
from pipeline.schemas import ContentItem, Effort, PolicyRef, ReasonerCall, ReviewReason, TriageScores

if TYPE_CHECKING:
    from pipeline.config import Settings

logger = logging.getLogger(__name__)

SAMPLING_PARAMETERS = {"temperature": 0, "skip_special_tokens": False}  # keep the harmony channel markers
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_NOT_LOADED_HINTS = ("unknown model", "is not ready", "not found", "no version")

# Why an answer was not accepted (ReasonerCall.escalation_reasons). The first five also keep an answer at the top
# effort unsettled (review); the last two only ask for a second look at the higher effort.
INVALID_OUTPUT, LOW_CONFIDENCE, UNKNOWN_RULES, RULES_DISAGREE, FAILED = (
    "invalid_output", "low_confidence", "unknown_rules", "rules_disagree", "failed",
)
CONTRADICTS_TRIAGE, HIGH_RISK_POLICY = "contradicts_triage", "high_risk_policy"
UNSETTLING = frozenset({INVALID_OUTPUT, LOW_CONFIDENCE, UNKNOWN_RULES, RULES_DISAGREE, FAILED})


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


@dataclass(frozen=True)
class Completion:
    """What a backend returns: the two harmony channels (and the token count, when the backend knows it)."""

    analysis: str
    final: str
    completion_tokens: int | None = None


class ReasonerBackend(Protocol):
    """One policy, one content, one effort -> the model's analysis and final channels.

    Raises RetryableError (ReasonerUnavailable, ReasonerTimeout) for transport failures and ModelOutputError for
    output that is not a harmony completion / chat answer.
    """

    model: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    async def complete(self, policy: Policy, content: str, effort: Effort, request_id: str) -> Completion: ...


class GenerateTransport(Protocol):
    """One decoupled generate call: harmony prompt text in, raw completion text out."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    async def generate(self, prompt: str, request_id: str) -> str: ...


class TritonGrpcTransport:
    """Decoupled generate over Triton's gRPC ``stream_infer`` (the vLLM backend's protocol)."""

    def __init__(self, triton: TritonSettings):
        self._settings = triton
        self._client = None  # tritonclient.grpc.aio.InferenceServerClient, made in start()
        self._streams: set = set()

    async def start(self) -> None:
        if self._client is None:
            import tritonclient.grpc.aio as grpc_aio  # imported late: heavy, and unit tests do not need it

            self._client = grpc_aio.InferenceServerClient(url=self._settings.grpc_url)

    async def close(self) -> None:
        for stream in list(self._streams):
            stream.cancel()  # an open stream keeps tritonserver alive after SIGTERM
        self._streams.clear()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def ready(self) -> bool:
        await self.start()
        try:
            return bool(
                await self._client.is_server_ready()  # type: ignore[union-attr]
                and await self._client.is_model_ready(self._settings.reasoner_model)  # type: ignore[union-attr]
            )
        except Exception as exc:  # noqa: BLE001 -- any failure to answer means "not ready"
            logger.debug("readiness check failed: %s", exc)
            return False

    def _inputs(self, prompt: str) -> list:
        from tritonclient.grpc import InferInput

        def tensor(name: str, dtype: str, value: object) -> InferInput:
            t = InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else np.bool_))
            return t

        return [
            tensor("text_input", "BYTES", prompt.encode("utf-8")),
            tensor("stream", "BOOL", False),
            tensor("sampling_parameters", "BYTES", json.dumps(SAMPLING_PARAMETERS).encode("utf-8")),
            tensor("exclude_input_in_output", "BOOL", True),
        ]

    async def generate(self, prompt: str, request_id: str) -> str:
        await self.start()
        request = {"model_name": self._settings.reasoner_model, "inputs": self._inputs(prompt), "request_id": request_id}

        async def one_request():  # type: ignore[no-untyped-def]
            yield request

        stream = self._client.stream_infer(one_request())  # type: ignore[union-attr]
        self._streams.add(stream)
        chunks: list[str] = []
        try:
            async for result, error in stream:
                if error is not None:
                    message = str(error)
                    if any(hint in message.lower() for hint in _NOT_LOADED_HINTS):
                        raise ReasonerUnavailable(f"model {self._settings.reasoner_model} not available: {message}")
                    raise ModelOutputError(f"model returned an error: {message}")
                out = result.as_numpy("text_output")
                if out is not None:
                    chunks.extend(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in out.reshape(-1))
                final = result.get_response().parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    break
        except grpc.aio.AioRpcError as exc:
            if exc.code() in _UNAVAILABLE_CODES:
                raise ReasonerUnavailable(f"triton at {self._settings.grpc_url}: {exc.code().name}") from exc
            raise ReasonerUnavailable(f"triton stream failed: {exc.code().name}: {exc.details()}") from exc
        finally:
            stream.cancel()
            self._streams.discard(stream)
        return "".join(chunks)


def _count_tokens(text: str) -> int | None:
    from pipeline.policies import _o200k

    enc = _o200k()
    return len(enc.encode_ordinary(text)) if enc is not None else None


class HarmonyBackend:
    """Renders harmony here and sends it through a raw-text GenerateTransport (Triton's vLLM backend, the stand-in)."""

    def __init__(self, transport: GenerateTransport, model: str):
        self.transport = transport
        self.model = model

    async def start(self) -> None:
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    async def ready(self) -> bool:
        return await self.transport.ready()

    async def complete(self, policy: Policy, content: str, effort: Effort, request_id: str) -> Completion:
        text = await self.transport.generate(render_prompt(policy.text, content, effort), request_id)
        out = parse_completion(text)
        return Completion(out.analysis, out.final, _count_tokens(text))


class CircuitBreaker:
    """Closed -> open after ``failures`` consecutive transport failures; open fails fast for ``reset_s``; then one
    trial call is let through (half-open): success closes it, failure opens it again.

    Why: when Triton is down, every item would otherwise wait out timeouts and retries, piling up in-flight calls
    and consumer lag; failing fast sends those items to review (fail closed) at once.
    """

    def __init__(self, failures: int, reset_s: float, clock=time.monotonic):  # type: ignore[no-untyped-def]
        self.failures = failures
        self.reset_s = reset_s
        self._clock = clock
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_in_flight = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "half_open" if self._clock() - self._opened_at >= self.reset_s else "open"

    def before_call(self) -> None:
        """Raise ReasonerUnavailable when the breaker is open (or its single trial call is already out)."""
        state = self.state
        if state == "open" or (state == "half_open" and self._trial_in_flight):
            raise ReasonerUnavailable("circuit breaker open: the reasoner failed repeatedly; failing fast")
        if state == "half_open":
            self._trial_in_flight = True

    def record_success(self) -> None:
        if self._opened_at is not None:
            logger.info("reasoner circuit breaker closed")
        self._consecutive, self._opened_at, self._trial_in_flight = 0, None, False
        metrics.reasoner_circuit_open.set(0)

    def record_failure(self) -> None:
        self._consecutive += 1
        self._trial_in_flight = False
        if self._opened_at is not None or self._consecutive >= self.failures:
            if self._opened_at is None:
                logger.warning("reasoner circuit breaker open after %d consecutive failures", self._consecutive)
            self._opened_at = self._clock()
            metrics.reasoner_circuit_open.set(1)


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
            backend = HarmonyBackend(transport or TritonGrpcTransport(triton), triton.reasoner_model)
        self._backend: ReasonerBackend = backend
        self._cache = cache
        self._single_flight = SingleFlight()
        self._breaker = breaker or CircuitBreaker(reasoner.breaker_failures, reasoner.breaker_reset_s)
        self._in_flight = asyncio.Semaphore(triton.max_in_flight)

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

    async def _complete_with_retries(self, policy: Policy, content: str, effort: Effort, request_id: str) -> Completion:
        """Retry retryable failures with bounded exponential backoff (jittered), through the circuit breaker."""
        attempt = 0
        while True:
            attempt += 1
            self._breaker.before_call()  # open: ReasonerUnavailable at once, no retries (they would fail fast too)
            try:
                async with self._in_flight:
                    completion = await asyncio.wait_for(
                        self._backend.complete(policy, content, effort, f"{request_id}-a{attempt}"),
                        timeout=self._triton.request_timeout_s,
                    )
                self._breaker.record_success()
                return completion
            except (TimeoutError, asyncio.TimeoutError):
                error: RetryableError = ReasonerTimeout(f"no answer within {self._triton.request_timeout_s}s")
            except RetryableError as exc:
                error = exc
            except ModelOutputError:
                self._breaker.record_success()  # the server answered: it is up
                raise
            self._breaker.record_failure()
            if attempt >= self._triton.max_attempts:
                raise error
            delay = min(self._triton.backoff_initial_s * 2 ** (attempt - 1), self._triton.backoff_max_s)
            logger.info("reasoner call %s failed (%s), retry %d in %.2fs", request_id, error, attempt, delay)
            metrics.retries_total.labels("reasoning", type(error).__name__).inc()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

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
        base = {"policy": policy.ref(), "model": self.model, "effort": effort}
        try:
            completion = await self._complete_with_retries(policy, item.text, effort, request_id)
            answer = parse_answer(completion.final, policy)
        except (RetryableError, ModelOutputError) as exc:
            latency = (time.perf_counter() - started) * 1000
            outcome = "unavailable" if isinstance(exc, RetryableError) else "invalid"
            metrics.reasoner_latency_seconds.labels(self.model, effort.value, outcome).observe(latency / 1000)
            logger.warning("reasoner call %s failed: %s: %s", request_id, type(exc).__name__, exc)
            return ReasonerCall(**base, error=f"{type(exc).__name__}: {exc}", latency_ms=latency)
        latency = (time.perf_counter() - started) * 1000
        metrics.reasoner_latency_seconds.labels(self.model, effort.value, "ok").observe(latency / 1000)
        if answer.invalid_rule_ids:
            logger.info("reasoner call %s cited undefined rules %s", request_id, answer.invalid_rule_ids)
        logger.info(
            "reasoner call %s: violation=%s confidence=%s rules=%s in %.0f ms",
            request_id, answer.violation, answer.confidence, answer.rule_ids, latency,
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
            completion_tokens=completion.completion_tokens,
        )
        if self._cache is not None and self._settings.cache_enabled:
            try:
                await self._cache.put(key, call)
            except Exception as exc:  # noqa: BLE001 -- a failed cache write only costs a later model call
                logger.warning("verdict cache write failed (%s: %s)", type(exc).__name__, exc)
        return call

    # -- checking an answer -------------------------------------------------------------------------------------

    def assess(self, call: ReasonerCall, policy: Policy, effort: Effort, triage: TriageScores | None) -> list[str]:
        """Why ``call`` is not accepted as final (empty list: accepted). See the module docstring."""
        if call.error is not None:
            return [FAILED]
        reasons: list[str] = []
        if call.output_errors:
            reasons.append(INVALID_OUTPUT)
        if call.confidence is None or call.confidence < self._settings.min_confidence:
            reasons.append(LOW_CONFIDENCE)
        if call.invalid_rule_ids:
            reasons.append(UNKNOWN_RULES)
        labels = {policy.rule(r).label for r in call.rule_ids if policy.rule(r) is not None}  # type: ignore[union-attr]
        if (call.violation and 1 not in labels) or (not call.violation and 1 in labels):
            reasons.append(RULES_DISAGREE)  # "violation" with no violating rule, or "safe" citing a violating one
        if triage is not None and (
            (not call.violation and triage.violation >= self._settings.triage_confident_above)
            or (call.violation and triage.violation <= self._settings.triage_confident_below)
        ):
            reasons.append(CONTRADICTS_TRIAGE)
        if policy.high_risk and _rank(effort) < _rank(policy.escalated_effort):
            reasons.append(HIGH_RISK_POLICY)
        return reasons

    # -- judging an item ----------------------------------------------------------------------------------------

    async def judge(
        self, item: ContentItem, policy_ids: list[str], triage: TriageScores | None = None
    ) -> ReasonerOutcome:
        """Judge ``item`` against ``policy_ids`` (empty: the default policies). PolicyError for unknown ids.

        ``triage`` (the escalation's scores) lets an answer that contradicts a confident triage score be checked
        again at the escalated effort.
        """
        started = time.perf_counter()
        policies = [self._library.get(pid) for pid in dict.fromkeys(policy_ids or self._library.default_ids())]
        if not policies:
            raise PolicyError("no policy to judge against")
        calls: list[ReasonerCall] = []
        latest: dict[str, ReasonerCall] = {}
        pending = {p.policy_id: p.first_effort for p in policies}
        efforts_used: list[Effort] = []
        while pending:
            round_policies = [p for p in policies if p.policy_id in pending]
            results = await asyncio.gather(*(self.call(item, p, pending[p.policy_id]) for p in round_policies))
            next_round: dict[str, Effort] = {}
            for policy, result in zip(round_policies, results):
                effort = pending[policy.policy_id]
                efforts_used.append(effort)
                reasons = self.assess(result, policy, effort, triage)
                result = result.model_copy(update={"escalation_reasons": reasons})
                calls.append(result)
                latest[policy.policy_id] = result
                transport_failure = (result.error or "").startswith(("ReasonerUnavailable", "ReasonerTimeout"))
                # Ask again harder for an answer we cannot accept; never for a transport failure that already used
                # its retries (a down server does not come back because we ask harder).
                if reasons and not transport_failure and _rank(policy.escalated_effort) > _rank(effort):
                    next_round[policy.policy_id] = policy.escalated_effort
            pending = next_round
        current = [latest[p.policy_id] for p in policies]
        by_id = {p.policy_id: p for p in policies}
        # The router reads "confident" answers; an answer we did not accept must not look confident to it.
        views = [c if not (set(c.escalation_reasons) & UNSETTLING) else c.model_copy(update={"confidence": None})
                 for c in current]
        accepted_violation = [c for c, v in zip(current, views) if v.confidence is not None and v.error is None
                              and v.confidence >= self._settings.min_confidence and c.violation]
        escalate = any(by_id[c.policy.policy_id].escalate_to_humans for c in accepted_violation)
        decision = route_reasoning(
            views, min_confidence=self._settings.min_confidence, can_raise_effort=False, escalate_to_humans=escalate
        )
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
            effort=max(efforts_used, key=_rank),
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


TritonReasoner = SafeguardReasoner  # the name the workers and older tests use


def build_reasoner(settings: Settings, library: PolicyLibrary) -> SafeguardReasoner:
    """The reasoner the config asks for: Triton or OpenAI-compatible backend, with the Redis verdict cache."""
    from pipeline.reasoner_cache import RedisVerdictCache

    backend: ReasonerBackend
    if settings.reasoner.backend == "openai":
        from pipeline.openai_backend import OpenAIChatBackend

        backend = OpenAIChatBackend(settings.reasoner, settings.triton.request_timeout_s)
    else:
        backend = HarmonyBackend(TritonGrpcTransport(settings.triton), settings.triton.reasoner_model)
    cache = (
        RedisVerdictCache(settings.redis, settings.reasoner.cache_ttl_s) if settings.reasoner.cache_enabled else None
    )
    return SafeguardReasoner(settings.triton, settings.reasoner, library, backend=backend, cache=cache)


def _rank(effort: Effort) -> int:
    return {Effort.LOW: 0, Effort.MEDIUM: 1, Effort.HIGH: 2}[Effort(effort)]
