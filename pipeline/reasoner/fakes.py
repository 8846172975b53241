"""Test doubles for the reasoner, scripted and strict: anything not in the script fails the test loudly.

* :class:`ScriptedTransport` replaces Triton under a real :class:`~pipeline.reasoner.SafeguardReasoner`, so the
  effort escalation, retries, parsing and routing are exercised without a server. Each step answers one
  ``(policy_id, effort)`` with a completion text (a finished answer), a
  :class:`~pipeline.reasoner.backends.GenerateResult` (finish reason, token counts, log-probabilities: e.g. a
  truncated answer) or an exception. Every prompt and every ``sampling_parameters`` dict sent is recorded.
* :class:`ScriptedReasoner` replaces the whole reasoner for worker tests: a ready-made outcome per content id.
* Real HTTP fakes of ``vllm serve`` and Ollama live in :mod:`pipeline.reasoner.fake_servers`; the CPU stand-in on
  Triton imitates the vLLM backend (``triton_repo/cpu/safeguard_standin_cpu``).

Unscripted use raises :class:`UnscriptedCall` (an AssertionError, which the reasoner never catches), and
``assert_done()`` fails when scripted steps were never used.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass, field

from pipeline.policies import PolicyLibrary
from pipeline.reasoner.backends import GenerateResult
from pipeline.reasoner.core import ReasonerOutcome
from pipeline.reasoner.harmony import render_completion
from pipeline.schemas import ContentItem, TriageScores


class UnscriptedCall(AssertionError):
    """A fake was used in a way its script did not foresee."""


def answer(
    violation: int,
    rule_ids: list[str],
    confidence: float | None,
    rationale: str = "scripted",
    *,
    analysis: str = "scripted analysis",
) -> str:
    """A harmony completion whose final channel is the given answer in the strict schema (``policy_category`` is
    the first cited rule); ``confidence=None`` leaves the key out, which the schema flags."""
    final: dict = {
        "violation": violation,
        "policy_category": rule_ids[0] if rule_ids else None,
        "rule_ids": rule_ids,
        "rationale": rationale,
    }
    if confidence is not None:
        final["confidence"] = confidence
    return render_completion(analysis, json.dumps(final))


@dataclass
class ScriptedTransport:
    """A GenerateTransport answering from a script keyed by ``(policy_id, effort)``, in order per key."""

    library: PolicyLibrary
    script: dict[tuple[str, str], list[str | GenerateResult | BaseException]] = field(default_factory=dict)
    is_ready: bool = True
    calls: list[tuple[str, str]] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # every prompt sent, for tests of what the model is told
    sampling: list[dict] = field(default_factory=list)  # every sampling_parameters dict sent
    started: bool = False
    closed: bool = False

    def __post_init__(self) -> None:
        self._queues = {key: deque(steps) for key, steps in self.script.items()}

    async def start(self) -> None:
        self.started = True

    async def close(self) -> None:
        self.closed = True

    async def ready(self) -> bool:
        return self.is_ready

    def _identify(self, prompt: str) -> tuple[str, str]:
        effort = re.search(r"Reasoning: (low|medium|high)", prompt)
        policy_id = next((p.policy_id for p in self.library if p.text.strip() in prompt), None)
        if effort is None or policy_id is None:
            raise UnscriptedCall("prompt names no known policy or effort")
        return policy_id, effort.group(1)

    async def generate(self, prompt: str, request_id: str, sampling: dict | None = None) -> str | GenerateResult:
        key = self._identify(prompt)
        self.calls.append(key)
        self.prompts.append(prompt)
        self.sampling.append(dict(sampling or {}))
        steps = self._queues.get(key)
        if not steps:
            raise UnscriptedCall(f"unscripted generate call for {key} (request {request_id})")
        step = steps.popleft()
        if isinstance(step, BaseException):
            raise step
        return step

    def assert_done(self) -> None:
        left = {key: len(q) for key, q in self._queues.items() if q}
        if left:
            raise AssertionError(f"scripted steps never used: {left}")


@dataclass
class ScriptedReasoner:
    """Stands in for SafeguardReasoner in worker tests: ``outcomes[content_id]`` is returned (or raised)."""

    outcomes: dict[str, ReasonerOutcome | BaseException]
    is_ready: bool = True
    judged: list[tuple[str, list[str]]] = field(default_factory=list)
    triages: list[TriageScores | None] = field(default_factory=list)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def ready(self) -> bool:
        return self.is_ready

    async def judge(
        self, item: ContentItem, policy_ids: list[str], triage: TriageScores | None = None
    ) -> ReasonerOutcome:
        self.judged.append((item.content_id, list(policy_ids)))
        self.triages.append(triage)
        if item.content_id not in self.outcomes:
            raise UnscriptedCall(f"unscripted judge call for content {item.content_id}")
        outcome = self.outcomes[item.content_id]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome
