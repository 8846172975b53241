"""The reasoner against a real tritonserver serving the CPU stand-in over the vLLM backend's wire protocol.

The stack is started here on ``triton_repo/cpu`` (the local model repository; ``triton_repo/gpu`` holds the
production vLLM models, which must never load locally). When ``pipeline.stack`` serves ``triton_repo/cpu`` by
default, this module fixture can be replaced by the shared ``local_stack`` session fixture.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import pytest

from pipeline.config import PROJECT_ROOT, ReasonerSettings, Settings, TritonSettings
from pipeline.errors import ModelOutputError
from pipeline.reasoner.harmony import parse_answer, parse_completion, render_prompt
from pipeline.policies import PolicyLibrary
from pipeline.policies.model import resolve_golden
from pipeline.reasoner.backends.triton import TritonGrpcTransport
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.router import ReasoningRoute
from pipeline.schemas import ContentItem, Effort, ReviewReason
from pipeline.stack import StackInfo, free_port

pytestmark = pytest.mark.integration
CPU_REPO = PROJECT_ROOT / "triton_repo" / "cpu"
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
DATASETS = Settings().datasets_dir  # golden references resolve from the shared datasets folder
VIOLENCE_GOLDEN = {g.ref: g for g in resolve_golden(LIB.get("violence").golden, DATASETS) if g.ref}
CLEAR_VIOLATION = VIOLENCE_GOLDEN["xstest:26"].text  # violence/golden.jsonl, label 1 (VI1.d)
CLEAR_BENIGN = VIOLENCE_GOLDEN["xstest:101"].text  # violence/golden.jsonl, label 0 (VI0.a)


@pytest.fixture(scope="module")
def triton(local_stack: StackInfo) -> StackInfo:
    """The session's stack: its Triton serves triton_repo/cpu (the stand-in only)."""
    return local_stack


def _settings(info: StackInfo, **kw: object) -> TritonSettings:
    return TritonSettings(grpc_url=info.triton_grpc, http_url=info.triton_http, **kw)  # type: ignore[arg-type]


def test_golden_rows_used_here_are_labelled_as_assumed() -> None:
    golden = {g.text: g.label for g in resolve_golden(LIB.get("violence").golden, DATASETS)}
    assert golden[CLEAR_VIOLATION] == 1 and golden[CLEAR_BENIGN] == 0


def test_standin_answers_harmony_over_stream_infer(triton: StackInfo) -> None:
    async def go() -> str:
        transport = TritonGrpcTransport(_settings(triton))
        try:
            assert await transport.ready()
            prompt = render_prompt(LIB.get("violence").text, CLEAR_VIOLATION, Effort.LOW)
            return await transport.generate(prompt, "it-1")
        finally:
            await transport.close()

    text = asyncio.run(go())
    assert text.startswith("<|channel|>analysis<|message|>")  # exclude_input_in_output=true: no echoed prompt
    assert text.endswith("<|return|>")
    out = parse_completion(text)
    assert "CPU stand-in for gpt-oss-safeguard" in out.analysis
    answer = parse_answer(out.final, LIB.get("violence"))
    assert answer.violation and answer.rule_ids and not answer.invalid_rule_ids


def test_clear_violation_blocks_and_clear_benign_allows(triton: StackInfo) -> None:
    async def go():  # type: ignore[no-untyped-def]
        async with SafeguardReasoner(_settings(triton), ReasonerSettings(), LIB) as reasoner:
            bad = await reasoner.judge(ContentItem(content_id="v1", text=CLEAR_VIOLATION), ["violence"])
            good = await reasoner.judge(ContentItem(content_id="v2", text=CLEAR_BENIGN), ["violence"])
            return bad, good

    bad, good = asyncio.run(go())
    violence = LIB.get("violence")
    assert bad.route is ReasoningRoute.BLOCK
    assert bad.rule_ids and set(bad.rule_ids) <= {r.rule_id for r in violence.rules if r.label == 1}
    assert bad.calls[0].model == "safeguard_standin_cpu" and bad.calls[0].error is None
    assert good.route is ReasoningRoute.ALLOW
    assert set(good.rule_ids) <= {r.rule_id for r in violence.rules if r.label == 0}
    assert bad.policies[0].content_hash == violence.content_hash


def test_many_concurrent_judgements(triton: StackInfo) -> None:
    texts = [g.text for g in resolve_golden(LIB.get("hate").golden, DATASETS)]

    async def go():  # type: ignore[no-untyped-def]
        async with SafeguardReasoner(_settings(triton, max_in_flight=16), ReasonerSettings(), LIB) as reasoner:
            items = [ContentItem(content_id=f"h{i}", text=t) for i, t in enumerate(texts)]
            return await asyncio.gather(*(reasoner.judge(i, ["hate", "harassment"]) for i in items))

    outcomes = asyncio.run(go())
    assert len(outcomes) == len(texts)
    assert all(c.error is None for o in outcomes for c in o.calls)


def test_dead_port_fails_closed_after_bounded_retries() -> None:
    settings = TritonSettings(grpc_url=f"127.0.0.1:{free_port()}", max_attempts=3, backoff_initial_s=0.05,
                              backoff_max_s=0.1, request_timeout_s=5)

    async def go():  # type: ignore[no-untyped-def]
        async with SafeguardReasoner(settings, ReasonerSettings(), LIB) as reasoner:
            assert not await reasoner.ready()
            return await reasoner.judge(ContentItem(content_id="d1", text="hello"), ["violence"])

    started = time.monotonic()
    outcome = asyncio.run(go())
    assert time.monotonic() - started < 10
    assert outcome.route is ReasoningRoute.REVIEW and outcome.review_reason is ReviewReason.REASONER_FAILED
    assert "ReasonerUnavailable" in (outcome.calls[0].error or "")


def _inputs(prompt: str):  # type: ignore[no-untyped-def]
    from tritonclient.grpc import InferInput

    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    stream = InferInput("stream", [1], "BOOL")
    stream.set_data_from_numpy(np.array([True]))
    params = InferInput("sampling_parameters", [1], "BYTES")
    params.set_data_from_numpy(np.array([json.dumps({"temperature": 0}).encode()], dtype=np.object_))
    return [text, stream, params]


def test_plain_infer_is_refused_and_stream_sends_chunks(triton: StackInfo) -> None:
    import tritonclient.grpc.aio as grpc_aio
    from tritonclient.utils import InferenceServerException

    prompt = render_prompt(LIB.get("violence").text, CLEAR_BENIGN, Effort.HIGH)

    async def go():  # type: ignore[no-untyped-def]
        client = grpc_aio.InferenceServerClient(triton.triton_grpc)
        try:
            with pytest.raises(InferenceServerException, match="decoupled"):
                await client.infer("safeguard_standin_cpu", _inputs(prompt))

            async def one():  # type: ignore[no-untyped-def]
                yield {"model_name": "safeguard_standin_cpu", "inputs": _inputs(prompt)}

            return [(r.as_numpy("text_output")[0].decode(), e) async for r, e in client.stream_infer(one())]
        finally:
            await client.close()

    chunks = asyncio.run(go())
    assert len(chunks) >= 2 and all(e is None for _, e in chunks)
    full = "".join(c for c, _ in chunks)
    assert full.startswith(prompt)  # exclude_input_in_output defaults to false, as in the vLLM backend
    assert not parse_answer(parse_completion(full).final, LIB.get("violence")).violation


def test_malformed_prompt_gets_an_error_response(triton: StackInfo) -> None:
    async def go():  # type: ignore[no-untyped-def]
        transport = TritonGrpcTransport(_settings(triton))
        try:
            with pytest.raises(ModelOutputError, match="harmony prompt"):
                await transport.generate("just some text, no harmony", "bad-1")
            # The server survives: a good prompt still works afterwards.
            return await transport.generate(render_prompt(LIB.get("hate").text, "hi", Effort.LOW), "ok-1")
        finally:
            await transport.close()

    assert parse_completion(asyncio.run(go())).final
