"""Triton Python backend for ``sleep_reasoner_bench``: a fixed-latency stand-in for a reasoning model (benchmarks).

Every request is answered ``latency_ms`` after it arrived, concurrently: ``execute`` only records a deadline and one
timer thread sends each response when it is due, so N requests in flight take ~latency_ms in total, like a batching
GPU server, and the benchmark measures whether the *client* keeps them in flight. The answer is a harmony
completion (analysis + final channel) saying "no violation", citing the first SAFE rule of the policy in the prompt.
"""

from __future__ import annotations

import heapq
import itertools
import json
import re
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

_SAFE_RULE = re.compile(r"\*\*([A-Z]{2,4}0\.[a-z]+)\*\*")


def _text(value) -> str:  # type: ignore[no-untyped-def]
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self._latency_s = float(params.get("latency_ms", "200")) / 1000.0
        self._heap: list = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sleep-bench-timer", daemon=True)
        self._thread.start()

    def execute(self, requests):  # type: ignore[no-untyped-def]
        due = time.monotonic() + self._latency_s
        with self._cond:
            for request in requests:
                heapq.heappush(self._heap, (due, next(self._order), request))
            self._cond.notify()
        return None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and (not self._heap or self._heap[0][0] > time.monotonic()):
                    self._cond.wait(timeout=(self._heap[0][0] - time.monotonic()) if self._heap else None)
                if self._stopping:
                    return
                _, _, request = heapq.heappop(self._heap)
            self._answer(request)

    def _answer(self, request) -> None:  # type: ignore[no-untyped-def]
        sender = request.get_response_sender()
        try:
            prompt = _text(pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0])
            exclude = pb_utils.get_input_tensor_by_name(request, "exclude_input_in_output")
            exclude = bool(exclude.as_numpy().reshape(-1)[0]) if exclude is not None else False
            rule = _SAFE_RULE.search(prompt)
            cited = [rule.group(1)] if rule else []
            final = json.dumps({
                "violation": 0, "policy_category": cited[0] if cited else None, "rule_ids": cited,
                "confidence": 0.9, "rationale": "benchmark model: fixed answer",
            })
            text = (f"<|channel|>analysis<|message|>sleep_reasoner_bench: slept {self._latency_s * 1000:.0f} ms<|end|>"
                    f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>")
            if not exclude:
                text = prompt + text
            out = pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))
            sender.send(pb_utils.InferenceResponse(output_tensors=[out]),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        except Exception as exc:  # noqa: BLE001 -- every request must get an answer
            try:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception:  # noqa: BLE001 -- the client went away
                pass

    def finalize(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=5)
