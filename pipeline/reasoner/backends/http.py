"""What the HTTP chat backends share: one client, one error mapping, the chat-template overhead, logprobs.

Errors map onto the same tree as the Triton backend: connection failures, timeouts, HTTP 408/429/5xx and an unknown
model (404: it may still be loading or pulling) are retryable (ReasonerUnavailable / ReasonerTimeout); any other 4xx
and a reply without a message are ModelOutputError with the server's own reason (a context overflow names it).
"""

from __future__ import annotations

import logging
import re
from typing import Any

import httpx

from pipeline.errors import ModelOutputError, ReasonerTimeout, ReasonerUnavailable
from pipeline.policies import Policy, count_tokens
from pipeline.reasoner.logprobs import TokenLogprob
from pipeline.schemas import Effort

logger = logging.getLogger(__name__)

RETRYABLE_STATUS = {404, 408, 409, 425, 429, 500, 502, 503, 504}
# The server renders its own chat template around the policy and the content (gpt-oss's system message with the
# date and the effort, the developer header, the turn markers): counted generously, since prompt + budget must fit.
CHAT_TEMPLATE_TOKENS = 160
_SKIPPED_MARKERS = re.compile(r"^\s*analysis(?P<analysis>.*)assistantfinal(?P<final>.*)$", re.DOTALL)


def server_error(response: httpx.Response) -> str:
    """The server's reason, from the error shapes vLLM, Ollama and OpenAI use, capped (never the request)."""
    try:
        data = response.json()
    except ValueError:
        return response.text[:300]
    error: Any = data.get("error", data) if isinstance(data, dict) else data
    if isinstance(error, dict):
        error = error.get("message", error)
    if isinstance(data, dict) and "message" in data and not isinstance(data.get("error"), (dict, str)):
        error = data["message"]
    return str(error)[:300]


def split_skipped_markers(content: str) -> tuple[str, str] | None:
    """(analysis, final) of raw gpt-oss text decoded with its special tokens skipped ("analysis...assistantfinal...")
    that a server without a harmony parser returns as the content; None for an ordinary answer."""
    m = _SKIPPED_MARKERS.match(content)
    return (m.group("analysis").strip(), m.group("final").strip()) if m else None


def openai_logprobs(items: Any) -> tuple[TokenLogprob, ...] | None:
    """OpenAI-style ``[{token, logprob, top_logprobs: [{token, logprob}]}]`` (vLLM, Ollama's /v1 and /api/chat)."""
    if not isinstance(items, list) or not items:
        return None
    out = []
    for item in items:
        if not isinstance(item, dict) or "token" not in item:
            continue
        top = tuple((str(t.get("token", "")), float(t.get("logprob", -1e9))) for t in item.get("top_logprobs") or [])
        out.append(TokenLogprob(str(item["token"]), float(item.get("logprob", -1e9)), top))
    return tuple(out) or None


class JsonHttpBackend:
    """A backend that POSTs one JSON request per call to ``base_url`` (subclasses say what and read the reply)."""

    model: str

    def __init__(self, base_url: str, timeout_s: float, headers: dict[str, str] | None = None,
                 transport: httpx.AsyncBaseTransport | None = None):
        self._base_url = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/json", **(headers or {})}
        self._timeout_s = timeout_s
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._overhead: dict[str, int] = {}

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self._base_url, headers=self._headers, timeout=self._timeout_s, transport=self._transport
            )

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def overhead_tokens(self, policy: Policy, effort: Effort) -> int:
        key = policy.content_hash
        if key not in self._overhead:
            self._overhead[key] = count_tokens(policy.text.strip()) + CHAT_TEMPLATE_TOKENS
        return self._overhead[key]

    async def get_json(self, path: str) -> Any:
        await self.start()
        response = await self._client.get(path)  # type: ignore[union-attr]
        return response.json() if response.status_code == 200 else None

    async def post(self, path: str, body: dict, request_id: str) -> dict:
        await self.start()
        try:
            response = await self._client.post(  # type: ignore[union-attr]
                path, json=body, headers={"X-Request-Id": request_id}
            )
        except httpx.TimeoutException as exc:
            raise ReasonerTimeout(f"{self._base_url}: {type(exc).__name__}") from exc
        except httpx.HTTPError as exc:
            raise ReasonerUnavailable(f"{self._base_url}: {type(exc).__name__}: {exc}") from exc
        if response.status_code in RETRYABLE_STATUS:
            raise ReasonerUnavailable(f"{self._base_url}: HTTP {response.status_code}: {server_error(response)}")
        if response.status_code != 200:
            raise ModelOutputError(f"{self._base_url}: HTTP {response.status_code}: {server_error(response)}")
        try:
            data = response.json()
        except ValueError as exc:
            raise ModelOutputError(f"{self._base_url}: reply is not JSON ({len(response.content)} bytes)") from exc
        if not isinstance(data, dict):
            raise ModelOutputError(f"{self._base_url}: reply is not a JSON object")
        return data
