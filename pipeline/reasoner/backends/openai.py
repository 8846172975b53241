"""The second reasoner backend: an OpenAI-compatible chat endpoint (``vllm serve``, Ollama, LM Studio).

Why: not every deployment runs Triton. gpt-oss-safeguard served by vLLM's own OpenAI server (or by Ollama on a
workstation) takes the policy as the system message and the content as the user message, exactly as OpenAI's
gpt-oss-safeguard guide calls it; the server renders harmony with its chat template and returns the channels
already split: ``message.content`` is the final channel, ``message.reasoning_content`` (vLLM) or
``message.reasoning`` (Ollama, newer vLLM) the analysis channel. The effort goes in ``reasoning_effort``.

Content is still neutralised: a server's chat template may render text with special tokens allowed.

Errors map onto the same tree as the Triton backend: connection failures, timeouts, HTTP 408/429/5xx and an unknown
model (404) are retryable (ReasonerUnavailable / ReasonerTimeout); any other 4xx and a reply without a message are
ModelOutputError.
"""

from __future__ import annotations

import logging

import httpx

from pipeline.config import ReasonerSettings
from pipeline.errors import ModelOutputError, ReasonerTimeout, ReasonerUnavailable
from pipeline.reasoner.harmony import neutralise
from pipeline.policies import Policy
from pipeline.reasoner.backends import Completion
from pipeline.schemas import Effort

logger = logging.getLogger(__name__)

_RETRYABLE_STATUS = {404, 408, 409, 425, 429, 500, 502, 503, 504}


def chat_request(model: str, policy: Policy, content: str, effort: Effort) -> dict:
    """The chat-completions body: policy as system message, neutralised content as user message."""
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": policy.text.strip()},
            {"role": "user", "content": neutralise(content)},
        ],
        "reasoning_effort": Effort(effort).value,
        "temperature": 0,
        "stream": False,
    }


class OpenAIChatBackend:
    """ReasonerBackend over ``POST {base_url}/chat/completions``."""

    def __init__(
        self,
        settings: ReasonerSettings,
        timeout_s: float,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ):
        self.model = settings.openai_model
        self._base_url = settings.openai_base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        if settings.openai_api_key is not None:
            headers["Authorization"] = f"Bearer {settings.openai_api_key.get_secret_value()}"
        self._headers = headers
        self._timeout_s = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self._base_url, headers=self._headers, timeout=self._timeout_s, transport=self._transport
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    async def ready(self) -> bool:
        await self.start()
        try:
            response = await self._client.get("/models")  # type: ignore[union-attr]
            return response.status_code == 200 and any(
                m.get("id") == self.model for m in response.json().get("data", [])
            )
        except (httpx.HTTPError, ValueError) as exc:
            logger.debug("readiness check failed: %s", exc)
            return False

    async def complete(self, policy: Policy, content: str, effort: Effort, request_id: str) -> Completion:
        await self.start()
        body = chat_request(self.model, policy, content, effort)
        try:
            response = await self._client.post(  # type: ignore[union-attr]
                "/chat/completions", json=body, headers={"X-Request-Id": request_id}
            )
        except httpx.TimeoutException as exc:
            raise ReasonerTimeout(f"{self._base_url}: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ReasonerUnavailable(f"{self._base_url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in _RETRYABLE_STATUS:
            raise ReasonerUnavailable(f"{self._base_url}: HTTP {response.status_code}")
        if response.status_code != 200:
            raise ModelOutputError(f"{self._base_url}: HTTP {response.status_code}: {response.text[:200]}")
        try:
            data = response.json()
            message = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ModelOutputError(f"chat reply has no message ({type(exc).__name__})") from exc
        final = message.get("content") or ""
        if not final.strip():
            raise ModelOutputError("chat reply has an empty final answer")
        analysis = message.get("reasoning_content") or message.get("reasoning") or ""
        usage = data.get("usage") or {}
        tokens = usage.get("completion_tokens")
        return Completion(
            analysis=str(analysis), final=str(final), completion_tokens=tokens if isinstance(tokens, int) else None
        )
