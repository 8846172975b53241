"""Where the reasoning model runs, behind one interface.

* :mod:`~pipeline.reasoner.backends.triton`: Triton's decoupled generate over gRPC ``stream_infer``, with harmony
  rendered by modpipe (how Triton's vLLM backend serves gpt-oss-safeguard; the CPU stand-in speaks the same);
* :mod:`~pipeline.reasoner.backends.openai`: an OpenAI-compatible chat endpoint (``vllm serve``, Ollama, LM Studio).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.schemas import Effort

if TYPE_CHECKING:
    from pipeline.policies import Policy


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
