"""The Triton backend: harmony rendered here, decoupled generate over gRPC ``stream_infer``.

This is how Triton's vLLM backend serves gpt-oss-safeguard: raw prompt text in, raw completion text out (special
tokens kept so the harmony channels can be read back). The CPU stand-in model speaks the same protocol.
"""

from __future__ import annotations

import json
import logging

import grpc
import numpy as np

from pipeline.config import TritonSettings
from pipeline.errors import ModelOutputError, ReasonerUnavailable
from pipeline.policies import Policy, o200k_encoding
from pipeline.reasoner.backends import Completion, GenerateTransport
from pipeline.reasoner.harmony import parse_completion, render_prompt
from pipeline.schemas import Effort

logger = logging.getLogger(__name__)

SAMPLING_PARAMETERS = {"temperature": 0, "skip_special_tokens": False}  # keep the harmony channel markers
_UNAVAILABLE_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED}
_NOT_LOADED_HINTS = ("unknown model", "is not ready", "not found", "no version")


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
    enc = o200k_encoding()
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
