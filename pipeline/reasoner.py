"""Policy reasoning: ask gpt-oss-safeguard (on Triton) about one item against each policy, escalating effort.

Why it is shaped like this:

* One call per policy (the cookbook: one policy per call beats many per call), all in flight at once but bounded
  by ``triton.max_in_flight`` through one semaphore shared by every ``judge`` of this worker.
* First at each policy's first effort (cheap); only the unsure or unusable answers are asked again at the
  escalated effort; then :func:`pipeline.router.route_reasoning` decides ALLOW / BLOCK / REVIEW.
* Fail closed: a call that still fails after bounded retries is recorded with ``error`` set, and the router
  sends the item to review. Unparseable output is a ModelOutputError on the call, never retried at the same
  effort (a deterministic model would answer the same again).
* The transport is decoupled generate over gRPC ``stream_infer``, exactly how Triton's vLLM backend serves
  gpt-oss-safeguard; the CPU stand-in speaks the same protocol. Each call opens one stream and closes it, so
  shutdown never leaves a stream that keeps the server alive.

Content is untrusted and never logged above DEBUG.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

import grpc
import numpy as np

from pipeline.config import ReasonerSettings, TritonSettings
from pipeline.errors import ModelOutputError, PolicyError, ReasonerTimeout, ReasonerUnavailable, RetryableError
from pipeline.harmony import parse_answer, parse_completion, render_prompt
from pipeline.policies import Policy, PolicyLibrary
from pipeline.router import ReasoningRoute, route_reasoning
from pipeline.schemas import ContentItem, Effort, PolicyRef, ReasonerCall, ReviewReason

logger = logging.getLogger(__name__)

SAMPLING_PARAMETERS = {"temperature": 0, "skip_special_tokens": False}  # keep the harmony channel markers
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_NOT_LOADED_HINTS = ("unknown model", "is not ready", "not found", "no version")


@dataclass(frozen=True)
class ReasonerOutcome:
    route: ReasoningRoute  # ALLOW, BLOCK or REVIEW (never RETRY_HIGHER_EFFORT)
    review_reason: ReviewReason | None
    calls: list[ReasonerCall]  # every call made, in order, including failed and superseded ones
    rule_ids: list[str]  # cited by the deciding calls, all defined by their policies
    rationale: str
    policies: list[PolicyRef]
    effort: Effort  # the highest effort used
    model: str
    latency_ms: float


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


class TritonReasoner:
    """Judges items against policies with gpt-oss-safeguard (or its CPU stand-in) on Triton."""

    def __init__(
        self,
        triton: TritonSettings,
        reasoner: ReasonerSettings,
        library: PolicyLibrary,
        *,
        transport: GenerateTransport | None = None,
    ):
        self._triton = triton
        self._settings = reasoner
        self._library = library
        self._transport: GenerateTransport = transport or TritonGrpcTransport(triton)
        self._in_flight = asyncio.Semaphore(triton.max_in_flight)

    async def start(self) -> None:
        await self._transport.start()

    async def close(self) -> None:
        await self._transport.close()

    async def ready(self) -> bool:
        return await self._transport.ready()

    async def __aenter__(self) -> TritonReasoner:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _generate_with_retries(self, prompt: str, request_id: str) -> str:
        """Retry retryable failures with bounded exponential backoff (jittered); re-raise the last one."""
        attempt = 0
        while True:
            attempt += 1
            try:
                async with self._in_flight:
                    return await asyncio.wait_for(
                        self._transport.generate(prompt, f"{request_id}-a{attempt}"),
                        timeout=self._triton.request_timeout_s,
                    )
            except (TimeoutError, asyncio.TimeoutError):
                error: RetryableError = ReasonerTimeout(f"no answer within {self._triton.request_timeout_s}s")
            except RetryableError as exc:
                error = exc
            if attempt >= self._triton.max_attempts:
                raise error
            delay = min(self._triton.backoff_initial_s * 2 ** (attempt - 1), self._triton.backoff_max_s)
            logger.info("reasoner call %s failed (%s), retry %d in %.2fs", request_id, error, attempt, delay)
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def call(self, item: ContentItem, policy: Policy, effort: Effort) -> ReasonerCall:
        """One policy, one effort: a ReasonerCall with the answer, or with ``error`` set (never raises for
        model or transport failures)."""
        started = time.perf_counter()
        request_id = f"{item.content_id}:{policy.policy_id}:{effort.value}:{uuid.uuid4().hex[:8]}"
        prompt = render_prompt(policy.text, item.text, effort)
        logger.debug("reasoner prompt for %s: content=%r", request_id, item.text)
        base = {"policy": policy.ref(), "model": self._triton.reasoner_model, "effort": effort}
        try:
            text = await self._generate_with_retries(prompt, request_id)
            answer = parse_answer(parse_completion(text).final, policy)
        except (RetryableError, ModelOutputError) as exc:
            latency = (time.perf_counter() - started) * 1000
            logger.warning("reasoner call %s failed: %s: %s", request_id, type(exc).__name__, exc)
            return ReasonerCall(**base, error=f"{type(exc).__name__}: {exc}", latency_ms=latency)
        latency = (time.perf_counter() - started) * 1000
        if answer.invalid_rule_ids:
            logger.info("reasoner call %s cited undefined rules %s", request_id, answer.invalid_rule_ids)
        logger.info(
            "reasoner call %s: violation=%s confidence=%s rules=%s in %.0f ms",
            request_id, answer.violation, answer.confidence, answer.rule_ids, latency,
        )
        return ReasonerCall(
            **base,
            violation=answer.violation,
            confidence=answer.confidence,
            rule_ids=answer.rule_ids,
            invalid_rule_ids=answer.invalid_rule_ids,
            rationale=answer.rationale,
            latency_ms=latency,
        )

    def _confident(self, call: ReasonerCall) -> bool:
        return call.error is None and call.confidence is not None and call.confidence >= self._settings.min_confidence

    async def judge(self, item: ContentItem, policy_ids: list[str]) -> ReasonerOutcome:
        """Judge ``item`` against ``policy_ids`` (empty: every enforcing policy). PolicyError for unknown ids."""
        started = time.perf_counter()
        policies = [self._library.get(pid) for pid in dict.fromkeys(policy_ids or self._library.enforcing_ids())]
        if not policies:
            raise PolicyError("no policy to judge against")
        calls: list[ReasonerCall] = []
        latest: dict[str, ReasonerCall] = {}
        pending = {p.policy_id: p.first_effort for p in policies}
        efforts_used: list[Effort] = []
        while True:
            round_policies = [p for p in policies if p.policy_id in pending]
            results = await asyncio.gather(*(self.call(item, p, pending[p.policy_id]) for p in round_policies))
            efforts_used.extend(pending.values())
            calls.extend(results)
            latest.update({p.policy_id: c for p, c in zip(round_policies, results)})
            current = [latest[p.policy_id] for p in policies]
            # Raise effort for answers that were unsure or unusable, never for a transport failure that
            # already used its retries (a down server will not come back because we ask harder).
            next_round = {
                p.policy_id: p.escalated_effort
                for p in round_policies
                if not self._confident(latest[p.policy_id])
                and not (latest[p.policy_id].error or "").startswith(("ReasonerUnavailable", "ReasonerTimeout"))
                and _rank(p.escalated_effort) > _rank(pending[p.policy_id])
            }
            escalate = any(
                p.escalate_to_humans and self._confident(latest[p.policy_id]) and bool(latest[p.policy_id].violation)
                for p in policies
            )
            decision = route_reasoning(
                current,
                min_confidence=self._settings.min_confidence,
                can_raise_effort=bool(next_round),
                escalate_to_humans=escalate,
            )
            if decision.route is not ReasoningRoute.RETRY_HIGHER_EFFORT:
                break
            pending = next_round
        deciding = self._deciding_calls(decision.route, decision.review_reason, current)
        rule_ids = list(dict.fromkeys(r for c in deciding for r in c.rule_ids))
        rationale = " | ".join(
            f"[{c.policy.policy_id} {c.policy.version}] " + (c.rationale if c.error is None else f"failed: {c.error}")
            for c in deciding
        )
        outcome = ReasonerOutcome(
            route=decision.route,
            review_reason=decision.review_reason,
            calls=calls,
            rule_ids=rule_ids,
            rationale=rationale,
            policies=[p.ref() for p in policies],
            effort=max(efforts_used, key=_rank),
            model=self._triton.reasoner_model,
            latency_ms=(time.perf_counter() - started) * 1000,
        )
        logger.info(
            "judged %s against %s: %s%s (%d calls, %.0f ms)",
            item.content_id, [p.policy_id for p in policies], outcome.route.value,
            f"/{outcome.review_reason.value}" if outcome.review_reason else "", len(calls), outcome.latency_ms,
        )
        return outcome

    def _deciding_calls(
        self, route: ReasoningRoute, reason: ReviewReason | None, current: list[ReasonerCall]
    ) -> list[ReasonerCall]:
        """The calls whose answers made the decision: their rule ids and rationale go into the outcome."""
        if route is ReasoningRoute.BLOCK or reason is ReviewReason.POLICY_ESCALATE:
            return [c for c in current if self._confident(c) and c.violation]
        if route is ReasoningRoute.ALLOW:
            return current
        if reason is ReviewReason.REASONER_FAILED:
            return [c for c in current if c.error is not None or not self._confident(c)]
        return [c for c in current if not self._confident(c)]


def _rank(effort: Effort) -> int:
    return {Effort.LOW: 0, Effort.MEDIUM: 1, Effort.HIGH: 2}[Effort(effort)]
