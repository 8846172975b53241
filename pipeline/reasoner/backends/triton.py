"""The Triton backend: harmony rendered here, decoupled generate over gRPC ``stream_infer``.

This is how Triton's vLLM backend serves gpt-oss-safeguard: raw prompt text in, raw completion text out. Read from
triton-inference-server/vllm_backend (``src/model.py``, ``src/utils/request.py``): every sampling parameter the
client leaves out takes vLLM's ``SamplingParams`` default, and those defaults break a harmony client: ``max_tokens``
16 (every answer cut off after a few words), ``skip_special_tokens`` true (the channel markers vanish), the prompt
echoed into ``text_output`` unless ``exclude_input_in_output``, and no finish reason or token counts unless asked
for. So the client sets, on every call:

* ``sampling_parameters``: ``max_tokens`` (the call's budget), ``temperature`` 0, ``skip_special_tokens`` and
  ``spaces_between_special_tokens`` false, ``stop_token_ids`` = harmony's end-of-turn tokens (``<|return|>``,
  ``<|call|>``; vLLM also reads them from the model's generation config, but a repository without it would run on),
  ``include_stop_str_in_output`` false, and ``logprobs`` (top alternatives per token) when the reasoner wants the
  verdict's probability;
* ``exclude_input_in_output`` true, ``stream`` false, and ``return_finish_reason``, ``return_num_input_tokens``,
  ``return_num_output_tokens`` (and ``return_logprobs``) true, so truncation and cost are reported, not guessed.

Errors: the backend answers a failed request with an error response ("Error generating stream: ..."); an unknown
or unloaded model is retryable (it may be loading), anything else is a ModelOutputError with the server's reason.
The CPU stand-in model applies the same defaults and errors, so a client that drops a parameter fails its tests.
"""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np

from pipeline.config import TritonSettings
from pipeline.errors import ModelOutputError, ReasonerUnavailable
from pipeline.policies import Policy
from pipeline.policies.model import count_harmony_tokens, o200k_encoding
from pipeline.reasoner.backends import Completion, GenerateResult, GenerateTransport, UnreadableCompletion
from pipeline.reasoner.harmony import parse_completion, render_prompt
from pipeline.reasoner.logprobs import TokenLogprob
from pipeline.schemas import Effort

logger = logging.getLogger(__name__)

# o200k_harmony ids of harmony's end-of-turn tokens (openai-harmony: stop_tokens_for_assistant_actions).
HARMONY_STOP_TOKEN_IDS = (200002, 200012)  # <|return|>, <|call|>
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_NOT_LOADED_HINTS = ("unknown model", "is not ready", "not found", "no version", "unavailable due to unhealthy")


def sampling_parameters(max_tokens: int, logprobs: int) -> dict:
    """The ``sampling_parameters`` JSON of one call: every parameter the harmony parsing depends on."""
    params: dict = {
        "max_tokens": int(max_tokens),
        "temperature": 0.0,
        "skip_special_tokens": False,
        "spaces_between_special_tokens": False,
        "stop_token_ids": list(HARMONY_STOP_TOKEN_IDS),
        "include_stop_str_in_output": False,
    }
    if logprobs > 0:
        params["logprobs"] = int(logprobs)
    return params


def _scalar(result, name: str):  # type: ignore[no-untyped-def]
    try:
        out = result.as_numpy(name)
    except Exception:  # noqa: BLE001 -- an output the server did not send
        return None
    if out is None or out.size == 0:
        return None
    value = out.reshape(-1)[0]
    return value.decode("utf-8") if isinstance(value, bytes) else value


def parse_vllm_logprobs(raw: str | None, text: str = "") -> tuple[TokenLogprob, ...] | None:
    """The backend's ``logprobs`` output (JSON: per token, ``{token_id: {logprob, rank, decoded_token}}``).

    Each position holds the sampled token and the top alternatives; the sampled one is the entry whose
    ``decoded_token`` continues ``text`` (the completion), else the best-ranked one (temperature 0 samples it).
    """
    if raw is None or raw == "null":
        return None
    try:
        positions = json.loads(raw)
    except json.JSONDecodeError:
        return None
    out: list[TokenLogprob] = []
    cursor = 0
    for position in positions or []:
        entries = sorted(position.values(), key=lambda e: e.get("rank") or 1_000_000)
        if not entries:
            continue
        chosen = next((e for e in entries if e.get("decoded_token") and text.startswith(e["decoded_token"], cursor)),
                      entries[0])
        cursor += len(chosen.get("decoded_token") or "")
        top = tuple((str(e.get("decoded_token") or ""), float(e["logprob"])) for e in entries if e is not chosen)
        out.append(TokenLogprob(str(chosen.get("decoded_token") or ""), float(chosen["logprob"]), top))
    return tuple(out)


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

    @staticmethod
    def inputs(prompt: str, sampling: dict) -> list:
        """The request's input tensors (public for tests of what the client sends)."""
        from tritonclient.grpc import InferInput

        def tensor(name: str, dtype: str, value: object) -> InferInput:
            t = InferInput(name, [1], dtype)
            t.set_data_from_numpy(np.array([value], dtype=np.object_ if dtype == "BYTES" else np.bool_))
            return t

        wants_logprobs = bool(sampling.get("logprobs"))
        return [
            tensor("text_input", "BYTES", prompt.encode("utf-8")),
            tensor("stream", "BOOL", False),
            tensor("sampling_parameters", "BYTES", json.dumps(sampling).encode("utf-8")),
            tensor("exclude_input_in_output", "BOOL", True),
            tensor("return_finish_reason", "BOOL", True),
            tensor("return_num_input_tokens", "BOOL", True),
            tensor("return_num_output_tokens", "BOOL", True),
            tensor("return_logprobs", "BOOL", wants_logprobs),
        ]

    async def generate(self, prompt: str, request_id: str, sampling: dict) -> GenerateResult:
        await self.start()
        request = {"model_name": self._settings.reasoner_model, "inputs": self.inputs(prompt, sampling),
                   "request_id": request_id}

        async def one_request():  # type: ignore[no-untyped-def]
            yield request

        stream = self._client.stream_infer(one_request())  # type: ignore[union-attr]
        self._streams.add(stream)
        chunks: list[str] = []
        finish_reason = prompt_tokens = completion_tokens = None
        logprob_chunks: list[dict] = []
        saw_logprobs = False
        try:
            async for result, error in stream:
                if error is not None:
                    message = str(error)
                    if any(hint in message.lower() for hint in _NOT_LOADED_HINTS):
                        raise ReasonerUnavailable(f"model {self._settings.reasoner_model} not available: {message}")
                    raise ModelOutputError(f"model returned an error: {message[:300]}")
                out = result.as_numpy("text_output")
                if out is not None:
                    chunks.extend(v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in out.reshape(-1))
                reason = _scalar(result, "finish_reason")
                if reason not in (None, "None"):
                    finish_reason = str(reason)
                n_in, n_out = _scalar(result, "num_input_tokens"), _scalar(result, "num_output_tokens")
                if n_in is not None:
                    prompt_tokens = int(n_in)
                if n_out is not None:
                    completion_tokens = (completion_tokens or 0) + int(n_out)
                raw_logprobs = _scalar(result, "logprobs")
                if raw_logprobs not in (None, "null"):
                    saw_logprobs = True
                    logprob_chunks.extend(json.loads(raw_logprobs))
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
        text = "".join(chunks)
        logprobs = parse_vllm_logprobs(json.dumps(logprob_chunks), text) if saw_logprobs else None
        return GenerateResult(text, finish_reason, prompt_tokens, completion_tokens, logprobs)


def _count(text: str) -> int | None:
    return count_harmony_tokens(text) if o200k_encoding() is not None else None


class HarmonyBackend:
    """Renders harmony here and sends it through a raw-text GenerateTransport (Triton's vLLM backend, the stand-in)."""

    def __init__(self, transport: GenerateTransport, model: str, *, logprobs: int = 0):
        self.transport = transport
        self.model = model
        self._logprobs = logprobs
        self._overhead: dict[tuple[str, str], int] = {}

    async def start(self) -> None:
        await self.transport.start()

    async def close(self) -> None:
        await self.transport.close()

    async def ready(self) -> bool:
        return await self.transport.ready()

    def overhead_tokens(self, policy: Policy, effort: Effort) -> int:
        key = (policy.content_hash, Effort(effort).value)
        if key not in self._overhead:  # one count per policy version and effort
            self._overhead[key] = count_harmony_tokens(render_prompt(policy.text, "", effort))
        return self._overhead[key]

    async def complete(
        self, policy: Policy, content: str, effort: Effort, request_id: str, *, max_tokens: int
    ) -> Completion:
        prompt = render_prompt(policy.text, content, effort)
        raw = await self.transport.generate(prompt, request_id, sampling_parameters(max_tokens, self._logprobs))
        result = raw if isinstance(raw, GenerateResult) else GenerateResult(raw)
        from_backend = result.completion_tokens is not None
        completion_tokens = result.completion_tokens if from_backend else _count(result.text)
        prompt_tokens = result.prompt_tokens if result.prompt_tokens is not None else _count(prompt)
        common = {"completion_tokens": completion_tokens, "prompt_tokens": prompt_tokens,
                  "finish_reason": result.finish_reason, "tokens_from_backend": from_backend,
                  "logprobs": result.logprobs}
        used_all = completion_tokens is not None and completion_tokens >= max_tokens
        if result.finish_reason == "length" or (result.finish_reason is None and used_all):
            return Completion(analysis=_partial_analysis(result.text), final="", **common)
        try:
            out = parse_completion(result.text)
        except ModelOutputError as exc:
            raise UnreadableCompletion(str(exc), Completion(_partial_analysis(result.text), "", **common)) from None
        return Completion(out.analysis, out.final, **common)


def _partial_analysis(text: str) -> str:
    """What a cut-off completion had said in its analysis (kept as evidence; never parsed as an answer)."""
    marker = "<|channel|>analysis<|message|>"
    return text.split(marker, 1)[1].split("<|end|>", 1)[0] if marker in text else text[:2000]


async def http_ready(triton: TritonSettings, timeout_s: float = 2.0) -> bool:
    """Whether Triton's HTTP endpoint (``triton.http_url``) reports the server and the reasoner model ready.

    The health check operators and probes use (``/v2/health/ready``, ``/v2/models/NAME/ready``); the generate calls
    themselves go over gRPC.
    """
    import httpx

    base = f"http://{triton.http_url}"
    try:
        async with httpx.AsyncClient(timeout=timeout_s) as client:
            server = await client.get(f"{base}/v2/health/ready")
            model = await client.get(f"{base}/v2/models/{triton.reasoner_model}/ready")
    except httpx.HTTPError as exc:
        logger.debug("triton health check at %s failed: %s", base, exc)
        return False
    return server.status_code == 200 and model.status_code == 200
