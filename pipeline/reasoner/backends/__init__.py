"""Where the reasoning model runs, behind one interface.

* :mod:`~pipeline.reasoner.backends.triton`: Triton's decoupled generate over gRPC ``stream_infer``, with harmony
  rendered by modpipe (how Triton's vLLM backend serves gpt-oss-safeguard; the CPU stand-in speaks the same);
* :mod:`~pipeline.reasoner.backends.openai`: an OpenAI-compatible chat endpoint (``vllm serve``, LM Studio, Ollama's
  ``/v1``);
* :mod:`~pipeline.reasoner.backends.ollama`: Ollama's native ``/api/chat`` (``think`` levels, ``num_ctx``).

Every backend sets, per call, each parameter its parsing relies on (the servers' defaults are traps: vLLM's
``max_tokens`` is 16 and it strips special tokens; Ollama streams and uses a small context unless told
otherwise), and reports what the server said about the call: finish reason, token counts, log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pipeline.errors import ModelOutputError
from pipeline.schemas import Effort

if TYPE_CHECKING:
    from pipeline.policies import Policy
    from pipeline.reasoner.logprobs import TokenLogprob


@dataclass(frozen=True)
class Completion:
    """What a backend returns for one call.

    ``final`` is empty when the answer was cut off (``finish_reason == "length"``): the reasoner never parses a
    truncated answer as if it were whole.
    """

    analysis: str
    final: str
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str | None = None
    tokens_from_backend: bool = False
    logprobs: tuple[TokenLogprob, ...] | None = None


class UnreadableCompletion(ModelOutputError):
    """The server answered, but not with a readable answer; ``completion`` keeps what it cost (tokens)."""

    def __init__(self, message: str, completion: Completion):
        super().__init__(message)
        self.completion = completion


@dataclass(frozen=True)
class GenerateResult:
    """One raw generate call: the completion text and what the server reported with it."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None


class ReasonerBackend(Protocol):
    """One policy, one content, one effort, one output budget -> the model's analysis and final answer.

    Raises RetryableError (ReasonerUnavailable, ReasonerTimeout) for transport failures and ModelOutputError for
    output that is not a harmony completion / chat answer.
    """

    model: str

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    def overhead_tokens(self, policy: Policy, effort: Effort) -> int:
        """Prompt tokens of a call without its content (the policy and the template around it)."""
        ...

    async def complete(
        self, policy: Policy, content: str, effort: Effort, request_id: str, *, max_tokens: int
    ) -> Completion: ...


class GenerateTransport(Protocol):
    """One decoupled generate call: harmony prompt text and sampling parameters in, the raw result out."""

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ready(self) -> bool: ...
    async def generate(self, prompt: str, request_id: str, sampling: dict) -> GenerateResult | str: ...
