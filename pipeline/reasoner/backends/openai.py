"""The OpenAI-compatible chat backend (``vllm serve``, LM Studio, Ollama's ``/v1``).

Why: not every deployment runs Triton. gpt-oss-safeguard served by vLLM's own OpenAI server (or LM Studio, or
Ollama's OpenAI-compatible endpoint) takes the policy as the system message and the content as the user message,
exactly as OpenAI's gpt-oss-safeguard guide calls it; the server renders harmony with its chat template and
returns the channels already split: ``message.content`` is the final channel, ``message.reasoning`` (vLLM >= 0.11,
Ollama) or ``message.reasoning_content`` (older vLLM, LM Studio) the analysis channel.

Every parameter the reading depends on is sent (read from vLLM's ``ChatCompletionRequest`` and Ollama's
``openai/openai.go``): ``reasoning_effort`` (omitted, both default to medium), ``max_tokens`` (the one name all
three read; vLLM's default is whatever the context leaves, Ollama's is unlimited), ``temperature`` 0 (vLLM's
default is the model's generation config, Ollama's /v1 sets 1.0), ``stream`` false, and ``logprobs`` with
``top_logprobs`` for the verdict's probability. ``finish_reason == "length"`` is a truncated answer, never parsed.
The context (``max_model_len``) is the server's: vLLM's ``--max-model-len``, LM Studio's load-time context length,
``OLLAMA_CONTEXT_LENGTH`` (Ollama's /v1 cannot set ``num_ctx`` per request; the native backend can).

Content is still neutralised: a server's chat template may render text with special tokens allowed.
"""

from __future__ import annotations

import logging
import re

import httpx

from pipeline.config import ReasonerSettings
from pipeline.errors import ModelOutputError
from pipeline.policies import Policy
from pipeline.reasoner.backends import Completion
from pipeline.reasoner.backends.http import JsonHttpBackend, openai_logprobs, split_skipped_markers
from pipeline.reasoner.harmony import neutralise, parse_completion
from pipeline.schemas import Effort

logger = logging.getLogger(__name__)


def chat_request(model: str, policy: Policy, content: str, effort: Effort, *, max_tokens: int,
                 logprobs: int = 0) -> dict:
    """The chat-completions body: policy as system message, neutralised content as user message."""
    body = {
        "model": model,
        "messages": [
            {"role": "system", "content": policy.text.strip()},
            {"role": "user", "content": neutralise(content)},
        ],
        "reasoning_effort": Effort(effort).value,
        "max_tokens": int(max_tokens),
        "temperature": 0,
        "stream": False,
    }
    if logprobs > 0:
        body.update({"logprobs": True, "top_logprobs": int(logprobs)})
    return body


def read_chat_reply(data: dict) -> Completion:
    """A chat-completions reply as a Completion (ModelOutputError when it holds no answer and was not cut off)."""
    try:
        choice = data["choices"][0]
        message = choice["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelOutputError(f"chat reply has no message ({type(exc).__name__})") from exc
    finish = choice.get("finish_reason")
    content = message.get("content") or ""
    analysis = message.get("reasoning") or message.get("reasoning_content") or ""
    if not isinstance(content, str) or not isinstance(analysis, str):
        raise ModelOutputError("chat reply's content or reasoning is not text")
    usage = data.get("usage") or {}
    prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
    logprobs = openai_logprobs((choice.get("logprobs") or {}).get("content"))
    common = {
        "prompt_tokens": prompt_tokens if isinstance(prompt_tokens, int) else None,
        "completion_tokens": completion_tokens if isinstance(completion_tokens, int) else None,
        "finish_reason": finish if isinstance(finish, str) else None,
        "tokens_from_backend": isinstance(completion_tokens, int),
        "logprobs": logprobs,
    }
    if finish == "length":
        return Completion(analysis=str(analysis), final="", **common)
    if "<|channel|>" in content:  # a server without a harmony parser passed the raw channels through
        out = parse_completion(content)
        return Completion(analysis=out.analysis or analysis, final=out.final, **common)
    split = split_skipped_markers(content) if not analysis else None
    if split is not None:
        analysis, content = split
    if not content.strip():
        raise ModelOutputError(f"chat reply has an empty final answer (finish_reason {finish}): the model wrote "
                               f"{'only its analysis' if analysis else 'nothing'}")
    return Completion(analysis=str(analysis), final=content.strip(), **common)


class OpenAIChatBackend(JsonHttpBackend):
    """ReasonerBackend over ``POST {base_url}/chat/completions``."""

    def __init__(
        self,
        settings: ReasonerSettings,
        timeout_s: float,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        headers = {}
        if settings.openai_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.openai_api_key.get_secret_value()}"
        super().__init__(settings.openai_base_url, timeout_s, headers, transport)
        self.model = settings.openai_model
        self._logprobs = settings.logprobs

    async def ready(self) -> bool:
        try:
            data = await self.get_json("/models")
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("readiness check failed: %s", exc)
            return False
        return isinstance(data, dict) and any(m.get("id") == self.model for m in data.get("data", []))

    async def complete(
        self, policy: Policy, content: str, effort: Effort, request_id: str, *, max_tokens: int
    ) -> Completion:
        body = chat_request(self.model, policy, content, effort, max_tokens=max_tokens, logprobs=self._logprobs)
        try:
            reply = await self.post("/chat/completions", body, request_id)
        except ModelOutputError as exc:
            if not (self._logprobs and refuses_logprobs(str(exc))):
                raise
            # Some OpenAI-compatible servers (and some models behind them) refuse logprobs with a 400. They are an
            # extra (the verdict's probability), not the answer: call this server without them from now on.
            logger.warning("%s refuses logprobs (%s); calling it without them (verdict_probability stays empty)",
                           self._base_url, str(exc)[:200])
            self._logprobs = 0
            body = chat_request(self.model, policy, content, effort, max_tokens=max_tokens, logprobs=0)
            reply = await self.post("/chat/completions", body, request_id)
        return read_chat_reply(reply)


def refuses_logprobs(error: str) -> bool:
    """A client error (400/422) whose reason names logprobs: the server does not do them, the request is fine."""
    return bool(re.search(r"HTTP 4(?:00|22)\b", error)) and "logprob" in error.lower()
