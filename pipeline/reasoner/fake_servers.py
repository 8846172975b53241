"""Real HTTP fakes of the servers people run gpt-oss-safeguard on, for tests and demos: ``vllm serve`` and Ollama.

They answer from the CPU stand-in (:class:`pipeline.reasoner.standin.StandinJudge`: it reads the policy it is sent)
and apply each server's defaults and errors, so a client that leaves out a parameter it depends on fails a test
the way it would fail against the real server. Each runs on a free loopback port (:class:`FakeServer`); every
request body is kept in ``app.state.requests``.

:func:`vllm_serve_app` imitates ``vllm serve openai/gpt-oss-safeguard-20b`` (written from vllm-project/vllm
``vllm/entrypoints/openai/chat_completion/protocol.py`` and ``vllm/sampling_params.py``):

* ``POST /v1/chat/completions``: system/developer messages are the policy (vLLM renders them as harmony developer
  instructions), the last user message the content; ``reasoning_effort`` low/medium/high, omitted = medium;
  ``max_tokens``/``max_completion_tokens`` omitted = whatever the context leaves; a prompt plus ``max_tokens``
  longer than ``max_model_len`` is a 400 naming both; ``temperature`` 0-2 (default 1.0); ``logprobs`` false by
  default, ``top_logprobs`` needs ``logprobs`` and at most 20; the channels come back split: ``message.content``
  (the final channel, None when cut off before it) and ``message.reasoning`` (or ``reasoning_content``, as vLLM
  before 0.11 names it); ``finish_reason`` "stop" or "length"; ``usage`` token counts; logprobs OpenAI-style;
  an unknown model is a 404; errors are ``{"error": {"message", "type", "param", "code"}}``;
* ``GET /v1/models``, ``GET /health``.

:func:`ollama_app` imitates ``ollama serve`` with ``gpt-oss-safeguard:20b`` pulled (written from ollama/ollama
``docs/api.md``, ``api/types.go``, ``openai/openai.go``, ``server/prompt.go`` and the runner's truncation):

* ``POST /api/chat``: ``stream`` defaults to true (a stream of JSON lines); ``think`` "low"/"medium"/"high"
  (gpt-oss ignores booleans; omitted = medium; another string is a 400); ``options.num_ctx`` defaults to the
  server's context length (4096, as on a machine with under 24 GiB of VRAM), ``num_predict`` to -1 (unlimited),
  ``temperature`` to 0.8; a prompt longer than ``num_ctx`` keeps its first ``num_keep`` (4) tokens and its tail,
  so the policy at its front is lost and the answer is of no use; output past ``num_predict`` ends with
  ``done_reason`` "length"; ``message.thinking`` / ``message.content``; ``prompt_eval_count`` / ``eval_count``;
  ``logprobs`` and ``top_logprobs`` (0-20); an unknown model is a 404 ``{"error": "model ... not found"}``;
* ``POST /v1/chat/completions`` (Ollama's OpenAI layer): ``reasoning_effort`` (or ``reasoning.effort``) becomes
  ``think``, ``max_tokens`` becomes ``num_predict``, ``temperature`` defaults to 1.0, the context is the server's
  (the OpenAI layer cannot set ``num_ctx``), ``message.reasoning``; errors ``{"error": {"message", "type", ...}}``;
* ``GET /api/tags``, ``GET /v1/models``.

Not imitated: sampling randomness (the stand-in writes one deterministic answer whatever the temperature), tool
calls, images, Ollama's context shifting during generation (output is capped at ``num_predict`` only).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from pipeline.reasoner import vllm_engine
from pipeline.reasoner.harmony import render_prompt
from pipeline.reasoner.standin import ParsedPrompt, StandinJudge

EFFORTS = ("low", "medium", "high")
_NO_POLICY = ("<|channel|>analysis<|message|>There is no policy here to classify against.<|end|><|start|>assistant"
              "<|channel|>final<|message|>I can't classify this without a policy. Could you share it?<|return|>")


class FakeServer:
    """A FastAPI app served by uvicorn on a free 127.0.0.1 port in a background thread (``with FakeServer(app)``)."""

    def __init__(self, app: FastAPI):
        import uvicorn

        self.app = app
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                     lifespan="off"))
        self._thread = threading.Thread(target=self._server.run, name="fake-server", daemon=True)
        self.url = ""

    def __enter__(self) -> FakeServer:
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    @property
    def requests(self) -> list[dict]:
        return self.app.state.requests


def _messages(body: dict) -> tuple[str, str]:
    """(policy, content): system and developer messages are the policy, the last user message the content."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list")
    policy = "\n\n".join(str(m.get("content") or "") for m in messages
                         if isinstance(m, dict) and m.get("role") in ("system", "developer"))
    users = [str(m.get("content") or "") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ValueError("messages need a user message")
    return policy.strip(), users[-1].replace("<\u200b|", "<|")


class _Model:
    """One "model": the judge plus what a chat server does around it (prompt rendering, the engine, channels)."""

    def __init__(self, judge: StandinJudge):
        self.judge = judge
        self._lock = threading.Lock()

    def prompt_tokens(self, policy: str, content: str, effort: str) -> int:
        return vllm_engine.count_prompt(render_prompt(policy or " ", content, effort))

    def run(self, policy: str, content: str, effort: str, sampling: vllm_engine.Sampling, max_model_len: int,
            prompt_tokens: int) -> vllm_engine.EngineOutput:
        if not policy:
            return vllm_engine.generate(_NO_POLICY, prompt_tokens, sampling, max_model_len)
        with self._lock:  # one embedding model: calls from the server's threads take turns
            generation = self.judge.generate_many([ParsedPrompt(effort, policy, content)])[0]
        j = generation.judgement
        written = j.p_violation if j.violation else 1 - j.p_violation
        other = generation.verdict_words[1] if j.violation else generation.verdict_words[0]
        return vllm_engine.generate(generation.text, prompt_tokens, sampling, max_model_len,
                                    verdict=(generation.verdict_offset, written, other))


def _token_logprobs(out: vllm_engine.EngineOutput, top: int) -> list[dict]:
    """OpenAI / Ollama logprobs: per token ``{token, logprob, bytes, top_logprobs}`` (the sampled token is the
    first entry of each position, see :func:`pipeline.reasoner.vllm_engine.generate`)."""
    items = []
    for entry in out.logprobs or []:
        sampled = next(iter(entry.values()))
        ranked = sorted(entry.values(), key=lambda e: e["rank"])
        items.append({
            "token": sampled["decoded_token"], "logprob": sampled["logprob"],
            "bytes": list(sampled["decoded_token"].encode()),
            "top_logprobs": [{"token": e["decoded_token"], "logprob": e["logprob"],
                              "bytes": list(e["decoded_token"].encode())} for e in ranked[:top]],
        })
    return items


def _openai_error(status: int, message: str, kind: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                        status_code=status)


async def _json_body(request: Request) -> dict:
    try:
        body = await request.json()
    except ValueError as exc:
        raise ValueError(f"request body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    request.app.state.requests.append(body)
    return body


def vllm_serve_app(judge: StandinJudge, *, model: str = "openai/gpt-oss-safeguard-20b", max_model_len: int = 32768,
                   reasoning_field: str = "reasoning", max_logprobs: int = 20) -> FastAPI:
    """A fake ``vllm serve`` (see the module docstring)."""
    app = FastAPI()
    app.state.requests = []
    engine = _Model(judge)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "vllm",
                                            "max_model_len": max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        try:
            body = await _json_body(request)
            policy, content = _messages(body)
        except ValueError as exc:
            return _openai_error(400, str(exc), "BadRequestError")
        if body.get("model") not in (None, model):
            return _openai_error(404, f"The model `{body.get('model')}` does not exist.", "NotFoundError", "model")
        effort = body.get("reasoning_effort") or "medium"
        if effort not in EFFORTS:
            return _openai_error(400, f"reasoning_effort {effort!r} is not supported by this model (low, medium, "
                                 "high)", "BadRequestError", "reasoning_effort")
        logprobs, top = body.get("logprobs") or False, body.get("top_logprobs") or 0
        if top and not logprobs:
            return _openai_error(400, "when using `top_logprobs`, `logprobs` must be set to true.", "BadRequestError",
                                 "top_logprobs")
        n_prompt = engine.prompt_tokens(policy, content, effort)
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if n_prompt + (max_tokens or 0) > max_model_len or n_prompt >= max_model_len:
            requested = n_prompt + (max_tokens or 0)
            return _openai_error(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                 f"requested {requested} tokens ({n_prompt} in the messages, {max_tokens or 0} in the "
                                 "completion). Please reduce the length of the messages or completion.",
                                 "BadRequestError", "messages")
        try:
            sampling = vllm_engine.Sampling(
                max_tokens=int(max_tokens) if max_tokens else max_model_len - n_prompt,
                temperature=float(body["temperature"]) if body.get("temperature") is not None else 1.0,
                skip_special_tokens=False,  # the server reads the channels from the tokens itself
                logprobs=int(top) if logprobs else None,
            )
            sampling.validate(max_logprobs)
        except (vllm_engine.SamplingError, TypeError, ValueError) as exc:
            return _openai_error(400, str(exc), "BadRequestError")
        out = await asyncio.to_thread(engine.run, policy, content, effort, sampling, max_model_len, n_prompt)
        analysis, final, complete = vllm_engine.split_channels(out.token_ids)
        message = {"role": "assistant", "content": final or None, reasoning_field: analysis or None}
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": out.finish_reason,
                                  "stop_reason": None, "logprobs": None}
        if logprobs:
            choice["logprobs"] = {"content": _token_logprobs(out, int(top))}
        usage = {"prompt_tokens": n_prompt, "completion_tokens": len(out.token_ids),
                 "total_tokens": n_prompt + len(out.token_ids)}
        reply = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
                 "model": model, "choices": [choice], "usage": usage}
        if body.get("stream"):
            return StreamingResponse(_sse(reply, reasoning_field), media_type="text/event-stream")
        return JSONResponse(reply)

    return app


def _sse(reply: dict, reasoning_field: str) -> Iterator[str]:
    """The reply as OpenAI chat-completion chunks: the reasoning, the content, then the finish reason."""
    choice = reply["choices"][0]
    base = {k: reply[k] for k in ("id", "created", "model")} | {"object": "chat.completion.chunk"}
    deltas = [{"role": "assistant", reasoning_field: choice["message"][reasoning_field]},
              {"content": choice["message"]["content"]}]
    for delta in deltas:
        yield "data: " + json.dumps({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}) + "\n\n"
    last = {"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}
    yield "data: " + json.dumps({**base, "choices": [last], "usage": reply["usage"]}) + "\n\n"
    yield "data: [DONE]\n\n"


def ollama_app(judge: StandinJudge, *, models: tuple[str, ...] = ("gpt-oss-safeguard:20b",),
               context_length: int = 4096) -> FastAPI:
    """A fake ``ollama serve`` with ``models`` pulled, started with ``OLLAMA_CONTEXT_LENGTH=context_length``."""
    app = FastAPI()
    app.state.requests = []
    engine = _Model(judge)
    names = set(models) | {m.removesuffix(":latest") for m in models}

    def think_level(value: Any) -> str:
        if value is None or isinstance(value, bool):
            return "medium"  # gpt-oss ignores true/false: its template's default level
        if value in EFFORTS:
            return str(value)
        raise ValueError(f'invalid think value: "{value}" (must be "high", "medium", "low", true, or false)')

    def answer(body: dict, effort: str, num_ctx: int, num_predict: int, top: int | None) -> tuple[dict, int]:
        policy, content = _messages(body)
        rendered = render_prompt(policy or " ", content, effort)
        n_prompt = vllm_engine.count_prompt(rendered)
        if n_prompt > num_ctx:  # the runner keeps num_keep tokens and the tail: the policy at the front is gone
            policy = ""
            n_prompt = num_ctx
        limit = num_predict if num_predict >= 0 else 1_000_000
        sampling = vllm_engine.Sampling(max_tokens=limit, skip_special_tokens=False, logprobs=top)
        out = engine.run(policy, content, effort, sampling, 10**9, n_prompt)
        analysis, final, _ = vllm_engine.split_channels(out.token_ids)
        message = {"role": "assistant", "content": final, "thinking": analysis}
        now = datetime.now(timezone.utc).isoformat()
        reply = {"model": body["model"], "created_at": now, "message": message, "done": True,
                 "done_reason": out.finish_reason, "total_duration": 1_000_000, "load_duration": 1_000,
                 "prompt_eval_count": n_prompt, "prompt_eval_duration": 100_000, "eval_count": len(out.token_ids),
                 "eval_duration": 900_000}
        if top is not None:
            reply["logprobs"] = _token_logprobs(out, top)
        return reply, n_prompt

    @app.get("/api/tags")
    async def tags() -> dict:
        return {"models": [{"name": m, "model": m, "size": 13_000_000_000, "details": {"family": "gptoss"}}
                           for m in models]}

    @app.get("/v1/models")
    async def v1_models() -> dict:
        return {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "library"}
                                           for m in models]}

    @app.post("/api/chat")
    async def chat(request: Request) -> Response:
        try:
            body = await _json_body(request)
            if body.get("model") not in names:
                return JSONResponse({"error": f'model "{body.get("model")}" not found, try pulling it first'},
                                    status_code=404)
            effort = think_level(body.get("think"))
            options = body.get("options") or {}
            top_logprobs = int(body.get("top_logprobs") or 0)
            if not 0 <= top_logprobs <= 20:
                raise ValueError("top_logprobs must be between 0 and 20")
            reply, _ = await asyncio.to_thread(
                answer, body, effort, int(options.get("num_ctx") or context_length),
                int(options.get("num_predict", -1)), top_logprobs if body.get("logprobs") else None)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        if body.get("stream", True):  # Ollama streams unless told not to
            return StreamingResponse(_ndjson(reply), media_type="application/x-ndjson")
        return JSONResponse(reply)

    @app.post("/v1/chat/completions")
    async def openai_chat(request: Request) -> Response:
        try:
            body = await _json_body(request)
        except ValueError as exc:
            return _openai_error(400, str(exc), "invalid_request_error")
        if body.get("model") not in names:
            return JSONResponse({"error": {"message": f'model "{body.get("model")}" not found, try pulling it first',
                                           "type": "not_found_error", "param": None, "code": None}}, status_code=404)
        effort_value = (body.get("reasoning") or {}).get("effort") or body.get("reasoning_effort")
        try:
            effort = think_level({"minimal": "low"}.get(effort_value, effort_value))
            max_tokens = body.get("max_tokens")
            top = int(body.get("top_logprobs") or 0)
            reply, n_prompt = await asyncio.to_thread(
                answer, body, effort, context_length, int(max_tokens) if max_tokens is not None else -1,
                top if body.get("logprobs") else None)
        except (ValueError, TypeError) as exc:
            error = {"message": f"invalid reasoning value: {exc}", "type": "invalid_request_error", "param": None,
                     "code": None}
            return JSONResponse({"error": error}, status_code=400)
        message = reply["message"]
        choice: dict[str, Any] = {
            "index": 0,
            "message": {"role": "assistant", "content": message["content"],
                        **({"reasoning": message["thinking"]} if message["thinking"] else {})},
            "finish_reason": reply["done_reason"],
        }
        if "logprobs" in reply:
            choice["logprobs"] = {"content": reply["logprobs"]}
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().int % 1000}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "system_fingerprint": "fp_ollama", "choices": [choice],
            "usage": {"prompt_tokens": n_prompt, "completion_tokens": reply["eval_count"],
                      "total_tokens": n_prompt + reply["eval_count"]},
        })

    return app


def _ndjson(reply: dict) -> Iterator[str]:
    """The reply as Ollama's stream: thinking, then content, then the final object with the counts."""
    base = {"model": reply["model"], "created_at": reply["created_at"], "done": False}
    message = reply["message"]
    yield json.dumps({**base, "message": {"role": "assistant", "content": "", "thinking": message["thinking"]}}) + "\n"
    yield json.dumps({**base, "message": {"role": "assistant", "content": message["content"]}}) + "\n"
    final = {k: v for k, v in reply.items() if k != "message"} | {"message": {"role": "assistant", "content": ""}}
    yield json.dumps(final) + "\n"
