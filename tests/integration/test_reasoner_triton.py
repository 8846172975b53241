"""The reasoner against a real tritonserver serving the CPU stand-in over the vLLM backend's wire protocol.

The session stack serves ``triton_repo/cpu`` (the local model repository; ``triton_repo/gpu`` holds the
production vLLM models, which must never load locally). The stand-in applies the vLLM backend's defaults to every
parameter a client leaves out, so each one the client sends is shown to matter here.
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
from pipeline.reasoner.backends import triton as triton_backend
from pipeline.reasoner.backends.triton import TritonGrpcTransport, sampling_parameters
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.router import ReasoningRoute
from pipeline.schemas import CallFailure, ContentItem, Effort, ReviewReason
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
    async def go():  # type: ignore[no-untyped-def]
        transport = TritonGrpcTransport(_settings(triton))
        try:
            assert await transport.ready()
            prompt = render_prompt(LIB.get("violence").text, CLEAR_VIOLATION, Effort.LOW)
            return await transport.generate(prompt, "it-1", sampling_parameters(4096, 5))
        finally:
            await transport.close()

    result = asyncio.run(go())
    text = result.text
    assert text.startswith("<|channel|>analysis<|message|>")  # exclude_input_in_output=true: no echoed prompt
    assert not text.endswith("<|return|>")  # the end-of-turn token is left out of the text, as vLLM does
    assert result.finish_reason == "stop" and result.prompt_tokens > 500 and result.completion_tokens > 50
    assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
    assert "".join(t.token for t in result.logprobs) == text + "<|return|>"  # the stop token is counted, not shown
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
    first = bad.calls[0]
    assert first.tokens_from_backend and first.finish_reason == "stop" and first.verdict_probability is not None
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


def _inputs(prompt: str, stream: bool, sampling: dict | None = None):  # type: ignore[no-untyped-def]
    from tritonclient.grpc import InferInput

    text = InferInput("text_input", [1], "BYTES")
    text.set_data_from_numpy(np.array([prompt.encode()], dtype=np.object_))
    stream_flag = InferInput("stream", [1], "BOOL")
    stream_flag.set_data_from_numpy(np.array([stream]))
    inputs = [text, stream_flag]
    if sampling is not None:
        params = InferInput("sampling_parameters", [1], "BYTES")
        params.set_data_from_numpy(np.array([json.dumps(sampling).encode()], dtype=np.object_))
        inputs.append(params)
    return inputs


def _stream(triton: StackInfo, inputs):  # type: ignore[no-untyped-def]
    import tritonclient.grpc.aio as grpc_aio

    async def go():  # type: ignore[no-untyped-def]
        client = grpc_aio.InferenceServerClient(triton.triton_grpc)
        try:
            async def one():  # type: ignore[no-untyped-def]
                yield {"model_name": "safeguard_standin_cpu", "inputs": inputs}

            return [(r.as_numpy("text_output")[0].decode() if r is not None else None, e)
                    async for r, e in client.stream_infer(one())]
        finally:
            await client.close()

    return asyncio.run(go())


def test_plain_infer_is_refused_and_stream_sends_chunks(triton: StackInfo) -> None:
    import tritonclient.grpc.aio as grpc_aio
    from tritonclient.utils import InferenceServerException

    prompt = render_prompt(LIB.get("violence").text, CLEAR_BENIGN, Effort.HIGH)
    sampling = {"temperature": 0, "max_tokens": 4096, "skip_special_tokens": False}

    async def refused():  # type: ignore[no-untyped-def]
        client = grpc_aio.InferenceServerClient(triton.triton_grpc)
        try:
            with pytest.raises(InferenceServerException, match="decoupled"):
                await client.infer("safeguard_standin_cpu", _inputs(prompt, True, sampling))
        finally:
            await client.close()

    asyncio.run(refused())
    chunks = _stream(triton, _inputs(prompt, True, sampling))
    assert len(chunks) >= 2 and all(e is None for _, e in chunks)
    full = "".join(c for c, _ in chunks)
    assert full.startswith("<|channel|>analysis")  # streaming never echoes the prompt
    assert not parse_answer(parse_completion(full).final, LIB.get("violence")).violation


def test_vllm_defaults_apply_to_every_parameter_the_client_leaves_out(triton: StackInfo) -> None:
    prompt = render_prompt(LIB.get("violence").text, CLEAR_BENIGN, Effort.LOW)
    ((text, error),) = _stream(triton, _inputs(prompt, False))  # no sampling_parameters at all
    assert error is None
    assert text.startswith(prompt)  # exclude_input_in_output defaults to false: the prompt is echoed
    answer = text[len(prompt):]
    assert answer.startswith("analysis") and "<|" not in answer  # special tokens skipped: no channel markers
    assert len(answer) < 120  # max_tokens defaults to 16
    with pytest.raises(ModelOutputError, match="skip_special_tokens"):
        parse_completion(answer)


@pytest.mark.parametrize("sampling,error", [
    ({"max_tokens": 100, "not_a_parameter": 1}, "'NoneType' object has no attribute 'lora_name'"),
    ({"max_tokens": 0}, "lora_name"),
    ({"temperature": 5}, "lora_name"),
])
def test_bad_sampling_parameters_get_the_vllm_backends_error(triton: StackInfo, sampling: dict, error: str) -> None:
    prompt = render_prompt(LIB.get("violence").text, CLEAR_BENIGN, Effort.LOW)
    ((text, failure),) = _stream(triton, _inputs(prompt, False, sampling))
    assert failure is not None and "Error generating stream" in str(failure) and error in str(failure)


@pytest.mark.parametrize("dropped", ["max_tokens", "skip_special_tokens", "return_finish_reason",
                                     "return_num_output_tokens", "return_logprobs"])
def test_a_client_that_drops_a_parameter_fails(triton: StackInfo, monkeypatch: pytest.MonkeyPatch,
                                               dropped: str) -> None:
    real_params, real_inputs = triton_backend.sampling_parameters, TritonGrpcTransport.inputs

    def params_without(*args):  # type: ignore[no-untyped-def]
        params = real_params(*args)
        params.pop(dropped, None)
        return params

    def inputs_without(prompt: str, sampling: dict) -> list:
        return [t for t in real_inputs(prompt, sampling) if t.name() != dropped]

    monkeypatch.setattr(triton_backend, "sampling_parameters", params_without)
    monkeypatch.setattr(TritonGrpcTransport, "inputs", staticmethod(inputs_without))

    async def go():  # type: ignore[no-untyped-def]
        async with SafeguardReasoner(_settings(triton), ReasonerSettings(cache_enabled=False), LIB) as reasoner:
            return await reasoner.judge(ContentItem(content_id="d", text=CLEAR_VIOLATION), ["violence"])

    call = asyncio.run(go()).calls[0]
    if dropped == "max_tokens":  # vLLM's 16-token default: cut off, retried, cut off again
        assert call.failure is CallFailure.TRUNCATED
    elif dropped == "skip_special_tokens":  # the channel markers vanish
        assert call.failure is CallFailure.INVALID_OUTPUT and "skip_special_tokens" in (call.error or "")
    elif dropped == "return_finish_reason":
        assert call.finish_reason is None
    elif dropped == "return_num_output_tokens":
        assert call.tokens_from_backend is False
    else:
        assert call.verdict_probability is None


def test_prompt_longer_than_the_context_is_refused_like_vllm(triton: StackInfo) -> None:
    prompt = render_prompt(LIB.get("violence").text, "word " * 40000, Effort.LOW)
    ((_, failure),) = _stream(triton, _inputs(prompt, False, {"max_tokens": 10}))
    assert failure is not None and "longer than the maximum model length of 32768" in str(failure)


def test_policies_in_the_guides_formats_are_judged_on_triton(triton: StackInfo, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from pipeline.policies.importer import import_policy

    fixtures = PROJECT_ROOT / "tests" / "fixtures" / "policies"
    for source, pid in (("junk_mail", "junk_mail"), ("dc_pack", "dc_pack"), ("hostility_md", "hostility"),
                        ("scam_words", "scam_words")):
        import_policy(fixtures / source, pid, tmp_path)
    library = PolicyLibrary.load(tmp_path)

    async def go():  # type: ignore[no-untyped-def]
        async with SafeguardReasoner(_settings(triton), ReasonerSettings(cache_enabled=False), library) as reasoner:
            return await asyncio.gather(*(
                reasoner.judge(ContentItem(content_id=f"g{i}", text=text), [pid]) for i, (pid, text) in enumerate([
                    ("junk_mail", "Your mailbox is full, confirm your password at this link."),
                    ("dc_pack", "Eat a detergent pod on camera and tag your friends."),
                    ("hostility", "You are a worthless idiot."),
                    ("scam_words", "You won a prize, pay a small fee to receive it."),
                ])))

    for outcome in asyncio.run(go()):
        for call in outcome.calls:
            assert call.error is None and call.output_errors == [], call
            assert call.finish_reason == "stop" and call.verdict_probability is not None


def test_malformed_prompt_gets_an_error_response(triton: StackInfo) -> None:
    async def go():  # type: ignore[no-untyped-def]
        transport = TritonGrpcTransport(_settings(triton))
        try:
            with pytest.raises(ModelOutputError, match="harmony prompt"):
                await transport.generate("just some text, no harmony", "bad-1", sampling_parameters(100, 0))
            # The server survives: a good prompt still works afterwards.
            return await transport.generate(render_prompt(LIB.get("hate").text, "hi", Effort.LOW), "ok-1",
                                            sampling_parameters(4096, 0))
        finally:
            await transport.close()

    assert parse_completion(asyncio.run(go()).text).final
