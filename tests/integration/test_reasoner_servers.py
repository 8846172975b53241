"""The chat backends against real HTTP fakes of ``vllm serve`` and Ollama (loopback ports, the stand-in's judge).

The fakes apply each server's defaults, so every parameter the client sends is shown to matter: drop it and the
call fails or changes. No stack is needed: the fakes run in this process.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT, ReasonerSettings, TritonSettings
from pipeline.policies import PolicyLibrary
from pipeline.policies.importer import GoldenSource, import_policy
from pipeline.reasoner.backends import ollama as ollama_backend
from pipeline.reasoner.backends import openai as openai_backend
from pipeline.reasoner.backends.ollama import OllamaChatBackend
from pipeline.reasoner.backends.openai import OpenAIChatBackend
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.reasoner.fake_servers import FakeServer, ollama_app, vllm_serve_app
from pipeline.reasoner.standin import StandinJudge, onnx_encoder
from pipeline.router import ReasoningRoute
from pipeline.schemas import CallFailure, ContentItem

pytestmark = pytest.mark.integration
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "policies"
FAST = TritonSettings(backoff_initial_s=0.01, backoff_max_s=0.02, max_attempts=2, request_timeout_s=30)
THREAT = "I am going to find you after school and break your legs."


@pytest.fixture(scope="module")
def judge() -> StandinJudge:
    return StandinJudge(onnx_encoder(1))


@pytest.fixture(scope="module")
def vllm(judge: StandinJudge):  # type: ignore[no-untyped-def]
    with FakeServer(vllm_serve_app(judge)) as server:
        yield server


@pytest.fixture(scope="module")
def ollama(judge: StandinJudge):  # type: ignore[no-untyped-def]
    with FakeServer(ollama_app(judge)) as server:
        yield server


def openai_reasoner(url: str, model: str, library: PolicyLibrary = LIB, **settings: object) -> SafeguardReasoner:
    reasoner = ReasonerSettings(backend="openai", openai_base_url=url, openai_model=model, cache_enabled=False,
                                **settings)  # type: ignore[arg-type]
    return SafeguardReasoner(FAST, reasoner, library, backend=OpenAIChatBackend(reasoner, 30))


def ollama_reasoner(url: str, library: PolicyLibrary = LIB, **settings: object) -> SafeguardReasoner:
    reasoner = ReasonerSettings(backend="ollama", ollama_url=url, cache_enabled=False, **settings)  # type: ignore[arg-type]
    return SafeguardReasoner(FAST, reasoner, library, backend=OllamaChatBackend(reasoner, 30))


def judge_one(reasoner: SafeguardReasoner, text: str, policy: str = "violence"):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with reasoner:
            assert await reasoner.ready()
            return await reasoner.judge(ContentItem(content_id="f1", text=text), [policy])

    return asyncio.run(go())


def test_vllm_serve_answers_with_split_channels_tokens_and_logprobs(vllm) -> None:  # type: ignore[no-untyped-def]
    seen = len(vllm.requests)
    outcome = judge_one(openai_reasoner(f"{vllm.url}/v1", "openai/gpt-oss-safeguard-20b"), THREAT)
    call = outcome.calls[0]
    assert call.error is None and call.analysis.startswith("CPU stand-in") and "effort low" in call.analysis
    assert call.tokens_from_backend and call.prompt_tokens > 500 and call.completion_tokens > 50
    assert call.finish_reason == "stop" and call.verdict_probability is not None
    body = vllm.requests[seen]  # the first call (the answer may have been asked again at high effort)
    assert (body["reasoning_effort"], body["max_tokens"], body["temperature"], body["top_logprobs"]) == ("low", 4096, 0, 5)


def test_vllm_serve_before_0_11_names_the_reasoning_field_reasoning_content(judge: StandinJudge) -> None:
    with FakeServer(vllm_serve_app(judge, reasoning_field="reasoning_content")) as old:
        call = judge_one(openai_reasoner(f"{old.url}/v1", "openai/gpt-oss-safeguard-20b"), THREAT).calls[0]
    assert call.error is None and call.analysis.startswith("CPU stand-in")


@pytest.mark.parametrize("dropped,consequence", [
    ("reasoning_effort", "the server reasons at medium effort"),
    ("logprobs", "no verdict probability"),
])
def test_vllm_serve_client_that_omits_a_parameter_fails(vllm, monkeypatch, dropped: str, consequence: str) -> None:  # type: ignore[no-untyped-def]
    real = openai_backend.chat_request

    def without(*args, **kwargs):  # type: ignore[no-untyped-def]
        body = real(*args, **kwargs)
        body.pop(dropped)
        body.pop("top_logprobs", None) if dropped == "logprobs" else None
        return body

    monkeypatch.setattr(openai_backend, "chat_request", without)
    call = judge_one(openai_reasoner(f"{vllm.url}/v1", "openai/gpt-oss-safeguard-20b"), THREAT).calls[0]
    if dropped == "reasoning_effort":
        assert "effort medium" in call.analysis, consequence
    else:
        assert call.verdict_probability is None, consequence


def test_vllm_serve_context_overflow_is_a_clear_failure_not_a_crash(judge: StandinJudge) -> None:
    with FakeServer(vllm_serve_app(judge, max_model_len=8192)) as small:
        # a client that believes the context is larger than the server's sends a budget that cannot fit
        reasoner = openai_reasoner(f"{small.url}/v1", "openai/gpt-oss-safeguard-20b", max_tokens_low=7800,
                                   max_tokens_high=7800)
        call = judge_one(reasoner, "hello").calls[0]
    assert call.failure is CallFailure.INVALID_OUTPUT and "maximum context length is 8192" in (call.error or "")


def test_vllm_serve_truncation_is_retried_then_reported(vllm) -> None:  # type: ignore[no-untyped-def]
    call = judge_one(openai_reasoner(f"{vllm.url}/v1", "openai/gpt-oss-safeguard-20b", max_tokens_low=30,
                                     max_tokens_high=30), THREAT).calls[0]
    assert call.failure is CallFailure.TRUNCATED and call.truncation_retries == 1 and call.max_tokens == 60
    assert call.completion_tokens == 90  # both attempts, as the server counted them


def test_unknown_model_is_unavailable(vllm) -> None:  # type: ignore[no-untyped-def]
    call = judge_one_unready(openai_reasoner(f"{vllm.url}/v1", "no-such-model"))
    assert call.failure is CallFailure.UNAVAILABLE and "does not exist" in (call.error or "")


def judge_one_unready(reasoner: SafeguardReasoner):  # type: ignore[no-untyped-def]
    async def go():  # type: ignore[no-untyped-def]
        async with reasoner:
            assert not await reasoner.ready()
            return await reasoner.judge(ContentItem(content_id="f2", text="x"), ["violence"])

    return asyncio.run(go()).calls[0]


def test_ollama_native_chat(ollama) -> None:  # type: ignore[no-untyped-def]
    seen = len(ollama.requests)
    call = judge_one(ollama_reasoner(ollama.url), THREAT).calls[0]
    assert call.error is None and "effort low" in call.analysis and call.tokens_from_backend
    assert call.verdict_probability is not None and call.finish_reason == "stop"
    body = ollama.requests[seen]
    assert (body["stream"], body["think"], body["options"]["num_ctx"]) == (False, "low", 32768)


@pytest.mark.parametrize("dropped", ["stream", "think", "num_ctx"])
def test_ollama_client_that_omits_a_parameter_fails(ollama, monkeypatch, dropped: str) -> None:  # type: ignore[no-untyped-def]
    real = ollama_backend.ollama_chat_request

    def without(*args, **kwargs):  # type: ignore[no-untyped-def]
        body = real(*args, **kwargs)
        (body["options"] if dropped == "num_ctx" else body).pop(dropped)
        return body

    monkeypatch.setattr(ollama_backend, "ollama_chat_request", without)
    # long content: past Ollama's default context the policy at the front of the prompt is dropped
    text = THREAT + " And another thing about the weather." * (500 if dropped == "num_ctx" else 1)
    outcome = judge_one(ollama_reasoner(ollama.url), text)
    call = outcome.calls[0]
    if dropped == "stream":
        assert call.failure is CallFailure.INVALID_OUTPUT and "not JSON" in (call.error or "")
    elif dropped == "think":
        assert "effort medium" in call.analysis
    else:
        assert call.failure is CallFailure.INVALID_OUTPUT and outcome.route is ReasoningRoute.REVIEW


def test_ollama_openai_compatible_endpoint(ollama) -> None:  # type: ignore[no-untyped-def]
    call = judge_one(openai_reasoner(f"{ollama.url}/v1", "gpt-oss-safeguard:20b"), THREAT).calls[0]
    assert call.error is None and "effort low" in call.analysis and call.tokens_from_backend


def test_every_shipped_and_imported_policy_is_read_without_truncation(vllm, ollama, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`policy test` through both fakes: no golden row's answer is truncated or unreadable, whatever the format."""
    from typer.testing import CliRunner

    from pipeline.cli.policy import policy_app

    root = tmp_path / "policies"
    import_policy(FIXTURES / "junk_mail", "junk_mail", root,
                  golden=[GoldenSource(FIXTURES / "junk_mail" / "golden.csv", "1", "2")])
    import_policy(FIXTURES / "hostility_md" / "policy.md", "hostility", root,
                  golden=[GoldenSource(FIXTURES / "hostility_md" / "validation.csv", rule_column="rule")])
    import_policy(FIXTURES / "dc_pack", "dc_pack", root,
                  golden=[GoldenSource(FIXTURES / "dc_pack" / "examples.csv", label_column="violation")])
    import_policy(FIXTURES / "scam_words", "scam_words", root, golden=[GoldenSource(
        FIXTURES / "scam_words" / "gold.csv", violation_values=("VIOLATING",), safe_values=("OK",))])
    env = {"MODPIPE_REASONER__POLICIES_DIR": str(root)}
    for url in (f"{vllm.url}/v1", "ollama://" + ollama.url.removeprefix("http://") + "/gpt-oss-safeguard:20b"):
        out = tmp_path / "report.json"
        result = CliRunner().invoke(policy_app, ["test", "--all", "--reasoner", url, "--model",
                                                 "openai/gpt-oss-safeguard-20b", "--json-out", str(out),
                                                 "--plot", str(tmp_path / "reliability.png")], env=env)
        assert result.exit_code == 0, result.output
        reports = {r["policy"]: r for r in json.loads(out.read_text())}
        assert set(reports) == {"junk_mail", "hostility", "dc_pack", "scam_words"}
        for report in reports.values():
            assert report["truncated_or_unparseable_share"] == 0 and report["schema_violations"] == 0, report
            assert report["confusion"]["no_answer"] == 0 and report["calibration"]["logprob"]["rows"] == report["rows"]
            assert report["accuracy"] >= 0.5 and report["prompt_tokens"]["mean"] > 100
        assert reports["scam_words"]["calibration"]["self_report"]["rows"] == reports["scam_words"]["rows"]
        assert reports["dc_pack"]["calibration"]["self_report"] is None  # 0/1 answers report no confidence
        assert (tmp_path / "reliability.png").stat().st_size > 10_000
