"""Triton Python backend for ``safeguard_standin_cpu``: the CPU stand-in for gpt-oss-safeguard.

Why it exists: the real reasoner needs GPUs and weights this environment cannot fetch, yet the pipeline must run
end to end locally and in CI against the *same wire protocol and the same server behaviour*. This model imitates
Triton's vLLM backend as read from triton-inference-server/vllm_backend (``src/model.py``,
``src/utils/request.py``, ``src/utils/vllm_backend_utils.py``):

* inputs ``text_input``, ``stream``, ``sampling_parameters``, ``exclude_input_in_output`` and the ``return_*``
  flags; outputs ``text_output`` and, only when asked, ``finish_reason``, ``cumulative_logprob``, ``logprobs``,
  ``num_input_tokens``, ``num_output_tokens``;
* the prompt is echoed into ``text_output`` unless ``exclude_input_in_output`` (not when streaming; streaming with
  it set false is an error);
* every sampling parameter the client omits takes vLLM's default (:mod:`pipeline.reasoner.vllm_engine`):
  ``max_tokens`` 16, special tokens skipped (the harmony markers vanish), no logprobs; the end-of-turn token is
  left out of the text; a prompt longer than ``max_model_len`` and a bad parameter are error responses worded as
  vLLM words them ("Error generating stream: ...", the text output "N/A").

What it "generates" is :class:`pipeline.reasoner.standin.StandinJudge`'s harmony completion: it reads the policy
in the developer message and judges the content by int8 ONNX MiniLM similarity (the triage worker's own embedder).

Concurrency: ``execute`` only enqueues; one worker thread drains the queue in batches (one embedding call per
batch) and answers each request through its decoupled response sender. Nothing here may raise out of the worker
thread: a request that cannot be answered gets an error response.

Environment: the stub's Python must see the venv's site-packages and the project (PYTHONPATH; ``pipeline.stack``
sets both).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from pipeline.reasoner import standin, vllm_engine  # noqa: E402

logger = logging.getLogger("safeguard_standin_cpu")
_STOP = object()
RETURN_FLAGS = ("return_finish_reason", "return_cumulative_logprob", "return_logprobs", "return_num_input_tokens",
                "return_num_output_tokens")


def _scalar(request, name: str):  # type: ignore[no-untyped-def]
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return tensor.as_numpy().reshape(-1)[0]


def _text(value) -> str:  # type: ignore[no-untyped-def]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class _Request:
    triton: object
    prompt: str
    parsed: standin.ParsedPrompt
    stream: bool
    prepend_input: bool
    sampling: vllm_engine.Sampling
    outputs: dict[str, bool]
    prompt_tokens: int


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("safeguard_standin_cpu must be decoupled, like the vLLM backend")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self._max_batch = int(params.get("max_batch", "32"))
        self._max_model_len = int(params.get("max_model_len", "32768"))
        started = time.monotonic()
        self._judge = standin.StandinJudge(standin.onnx_encoder(int(params.get("embedder_threads", "1"))))
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="standin-worker", daemon=True)
        self._worker.start()
        print(f"[{standin.STANDIN_NAME}] {standin.STANDIN_NOTICE}: ready in {time.monotonic() - started:.1f}s",
              flush=True)

    def execute(self, requests):  # type: ignore[no-untyped-def]
        for request in requests:
            self._queue.put(request)
        return None  # decoupled: responses go through each request's sender

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < self._max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._queue.put(_STOP)
                    break
                batch.append(item)
            self._answer_batch(batch)

    def _read(self, request) -> _Request:  # type: ignore[no-untyped-def]
        """The inputs as the vLLM backend's GenerateRequest._get_input_tensors reads them (ValueError on misuse)."""
        prompt = _text(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0])
        stream = bool(_scalar(request, "stream") or False)
        exclude = _scalar(request, "exclude_input_in_output")
        prepend_input = (not bool(exclude)) if exclude is not None else (not stream)
        if prepend_input and stream:
            raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
        raw = _scalar(request, "sampling_parameters")
        sampling = vllm_engine.sampling_from_triton(_text(raw) if raw is not None else request.parameters())
        outputs = {name: bool(_scalar(request, name) or False) for name in RETURN_FLAGS}
        prompt_tokens = vllm_engine.count_prompt(prompt)
        if prompt_tokens > self._max_model_len:
            raise ValueError(f"The decoder prompt (length {prompt_tokens}) is longer than the maximum model length of "
                             f"{self._max_model_len}. Make sure that `max_model_len` is no smaller than the number "
                             "of text tokens.")
        try:
            parsed = standin.parse_prompt(prompt)
        except standin.PromptError as exc:
            raise ValueError(f"{standin.STANDIN_NAME}: bad request: {exc}") from None
        return _Request(request, prompt, parsed, stream, prepend_input, sampling, outputs, prompt_tokens)

    def _answer_batch(self, requests) -> None:  # type: ignore[no-untyped-def]
        parsed: list[_Request] = []
        for request in requests:
            try:
                parsed.append(self._read(request))
            except (ValueError, UnicodeDecodeError, AttributeError, TypeError) as exc:
                self._fail(request, f"Error generating stream: {exc}")
        if not parsed:
            return
        try:
            generations = self._judge.generate_many([r.parsed for r in parsed])
        except Exception as exc:  # noqa: BLE001 -- the worker thread must answer every request, whatever failed
            logger.exception("stand-in failed on a batch")
            for r in parsed:
                self._fail(r.triton, f"Error generating stream: {standin.STANDIN_NAME}: {type(exc).__name__}")
            return
        for r, generation in zip(parsed, generations):
            try:
                self._respond(r, generation)
            except Exception as exc:  # noqa: BLE001 -- one bad answer must not cost the others theirs
                logger.exception("stand-in could not answer a request")
                self._fail(r.triton, f"Error generating stream: {exc}")

    def _respond(self, r: _Request, g: standin.Generation) -> None:
        written = g.judgement.p_violation if g.judgement.violation else 1 - g.judgement.p_violation
        other = g.verdict_words[1] if g.judgement.violation else g.verdict_words[0]
        out = vllm_engine.generate(g.text, r.prompt_tokens, r.sampling, self._max_model_len,
                                   verdict=(g.verdict_offset, written, other))
        if r.stream:  # deltas, like vLLM's RequestOutputKind.DELTA: the analysis, then the rest
            split = max(1, min(len(out.token_ids) - 1, len(out.token_ids) // 2))
            first = vllm_engine.generate(g.text, r.prompt_tokens, _capped(r.sampling, split), self._max_model_len,
                                         verdict=(g.verdict_offset, written, other))
            parts = [(first, first.text, None)] if len(out.token_ids) > 1 else []
            parts.append((out, out.text[len(first.text):] if parts else out.text, out.finish_reason))
        else:
            parts = [(out, (r.prompt if r.prepend_input else "") + out.text, out.finish_reason)]
        sender = r.triton.get_response_sender()
        previous = 0
        for i, (engine, text, finish) in enumerate(parts):
            tokens = len(engine.token_ids) - previous
            tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
            if r.outputs["return_finish_reason"]:
                tensors.append(pb_utils.Tensor("finish_reason", np.array([str(finish).encode()], dtype=np.object_)))
            if r.outputs["return_cumulative_logprob"]:
                tensors.append(pb_utils.Tensor("cumulative_logprob",
                                               np.array([engine.cumulative_logprob], dtype=np.float32)))
            if r.outputs["return_logprobs"]:
                payload = "null" if engine.logprobs is None else json.dumps(engine.logprobs[previous:])
                tensors.append(pb_utils.Tensor("logprobs", np.array([payload.encode()], dtype=np.object_)))
            if r.outputs["return_num_input_tokens"]:
                tensors.append(pb_utils.Tensor("num_input_tokens", np.array(r.prompt_tokens, dtype=np.uint32)))
            if r.outputs["return_num_output_tokens"]:
                tensors.append(pb_utils.Tensor("num_output_tokens", np.array([tokens], dtype=np.uint32)))
            previous = len(engine.token_ids)
            last = i == len(parts) - 1
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=tensors),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
            except pb_utils.TritonModelException as exc:  # the client went away (cancelled stream)
                logger.warning("could not send a response: %s", exc)
                return

    def _fail(self, request, message: str) -> None:  # type: ignore[no-untyped-def]
        """The vLLM backend's error response: ``text_output`` "N/A" and the error."""
        try:
            out = pb_utils.Tensor("text_output", np.array([b"N/A"], dtype=np.object_))
            request.get_response_sender().send(
                pb_utils.InferenceResponse(output_tensors=[out], error=pb_utils.TritonError(message)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except pb_utils.TritonModelException as exc:
            logger.warning("could not send an error response: %s", exc)

    def finalize(self) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout=10)


def _capped(sampling: vllm_engine.Sampling, max_tokens: int) -> vllm_engine.Sampling:
    from dataclasses import replace

    return replace(sampling, max_tokens=min(max_tokens, sampling.max_tokens or max_tokens))
