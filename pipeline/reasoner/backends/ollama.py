"""Ollama's native chat API (``POST /api/chat``), the way to run gpt-oss-safeguard on a workstation.

Read from ollama/ollama (``docs/api.md``, ``api/types.go``, ``server/prompt.go``): Ollama's defaults are traps for
a classifier. ``stream`` is true unless set false (the reply is a stream of JSON lines); the context is
``OLLAMA_CONTEXT_LENGTH`` (4k on a machine with under 24 GiB of VRAM), and a prompt longer than it loses the tokens
after the first four: the policy at the front of the prompt is what goes; ``num_predict`` is unlimited;
``temperature`` is 0.8; and gpt-oss reads only ``think`` levels (``"low"``, ``"medium"``, ``"high"``; a boolean is
ignored, omitted means medium). So every call sends ``stream`` false, ``think`` = the effort, and
``options.num_ctx`` (``reasoner.max_model_len``), ``options.num_predict`` (the budget) and ``options.temperature``
0, plus ``logprobs``/``top_logprobs`` for the verdict's probability. ``done_reason == "length"`` is a truncated
answer. The reply's ``message.thinking`` is the analysis channel, ``message.content`` the final one;
``prompt_eval_count`` and ``eval_count`` are the token counts.
"""

from __future__ import annotations

import logging

import httpx

from pipeline.config import ReasonerSettings
from pipeline.errors import ModelOutputError
from pipeline.policies import Policy
from pipeline.reasoner.backends import Completion
from pipeline.reasoner.backends.http import JsonHttpBackend, openai_logprobs
from pipeline.reasoner.harmony import neutralise
from pipeline.schemas import Effort

logger = logging.getLogger(__name__)


def ollama_chat_request(model: str, policy: Policy, content: str, effort: Effort, *, max_tokens: int,
                        num_ctx: int, logprobs: int = 0) -> dict:
    body: dict = {
        "model": model,
        "messages": [
            {"role": "system", "content": policy.text.strip()},
            {"role": "user", "content": neutralise(content)},
        ],
        "stream": False,
        "think": Effort(effort).value,
        "options": {"num_ctx": int(num_ctx), "num_predict": int(max_tokens), "temperature": 0},
    }
    if logprobs > 0:
        body.update({"logprobs": True, "top_logprobs": int(logprobs)})
    return body


class OllamaChatBackend(JsonHttpBackend):
    """ReasonerBackend over Ollama's ``POST {ollama_url}/api/chat``."""

    def __init__(self, settings: ReasonerSettings, timeout_s: float, *,
                 transport: httpx.AsyncBaseTransport | None = None):
        super().__init__(settings.ollama_url, timeout_s, transport=transport)
        self.model = settings.ollama_model
        self._num_ctx = settings.max_model_len
        self._logprobs = settings.logprobs

    async def ready(self) -> bool:
        try:
            data = await self.get_json("/api/tags")
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("readiness check failed: %s", exc)
            return False
        models = (data or {}).get("models", [])
        names = {m.get("name") for m in models} | {m.get("model") for m in models}
        return self.model in names or f"{self.model}:latest" in names

    async def complete(
        self, policy: Policy, content: str, effort: Effort, request_id: str, *, max_tokens: int
    ) -> Completion:
        body = ollama_chat_request(self.model, policy, content, effort, max_tokens=max_tokens, num_ctx=self._num_ctx,
                                   logprobs=self._logprobs)
        data = await self.post("/api/chat", body, request_id)
        message = data.get("message")
        if not isinstance(message, dict) or data.get("done") is not True:
            raise ModelOutputError("ollama reply has no finished message")
        finish = data.get("done_reason")
        content_out, thinking = message.get("content") or "", message.get("thinking") or ""
        n_in, n_out = data.get("prompt_eval_count"), data.get("eval_count")
        common = {
            "prompt_tokens": n_in if isinstance(n_in, int) else None,
            "completion_tokens": n_out if isinstance(n_out, int) else None,
            "finish_reason": finish if isinstance(finish, str) else None,
            "tokens_from_backend": isinstance(n_out, int),
            "logprobs": openai_logprobs(data.get("logprobs")),
        }
        if finish == "length":
            return Completion(analysis=str(thinking), final="", **common)
        if not str(content_out).strip():
            raise ModelOutputError(f"ollama reply has an empty final answer (done_reason {finish}): the model wrote "
                                   f"{'only its thinking' if thinking else 'nothing'}")
        return Completion(analysis=str(thinking), final=str(content_out).strip(), **common)
