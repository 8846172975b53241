"""The CPU stand-in: it reads policies in the guide's formats, and vLLM's engine defaults apply to what it writes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from pipeline.config import PROJECT_ROOT
from pipeline.policies import PolicyLibrary
from pipeline.reasoner import vllm_engine
from pipeline.reasoner.harmony import parse_completion, render_prompt
from pipeline.reasoner.standin import ParsedPrompt, PromptError, StandinJudge, onnx_encoder, parse_prompt
from pipeline.reasoner.vllm_engine import LORA_ERROR, Sampling, SamplingError, generate, sampling_from_triton

pytestmark = pytest.mark.unit
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "policies"


def bag_of_words(texts):  # type: ignore[no-untyped-def]
    """A tiny deterministic encoder (hashed words) so format tests need no model."""
    out = np.zeros((len(texts), 256), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in text.lower().split():
            out[row, int(hashlib.md5(word.strip('.,!?"').encode()).hexdigest(), 16) % 256] += 1
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return out / np.where(norms == 0, 1, norms)


JUDGE = StandinJudge(bag_of_words)


def one(policy_text: str, content: str, effort: str = "low"):  # type: ignore[no-untyped-def]
    return JUDGE.generate_many([ParsedPrompt(effort, policy_text, content)])[0]


def test_answers_in_the_format_the_policy_text_asks_for() -> None:
    junk = (FIXTURES / "junk_mail" / "policy.txt").read_text()
    g = one(junk, "Confirm your password at this link, your mailbox is full")
    final = parse_completion(g.text).final
    assert final.split()[0] in ("INVALID", "VALID") and g.verdict_words == ("INVALID", "VALID")
    assert g.text[g.verdict_offset:].startswith(final.split()[0])
    dc = (FIXTURES / "dc_pack" / "policy.md").read_text()
    assert parse_completion(one(dc, "eat a detergent pod and post it").text).final in ("0", "1")
    words = json.loads(parse_completion(one((FIXTURES / "scam_words" / "policy.md").read_text(), "win a prize").text).final)
    assert set(words) == {"violation", "rule_ids", "confidence", "rationale"} and words["confidence"] in (
        "low", "medium", "high")
    strict = json.loads(parse_completion(one(LIB.get("violence").text, "I will hurt you").text).final)
    assert list(strict) == ["violation", "policy_category", "rule_ids", "confidence", "rationale"]


def test_a_policy_without_rules_gets_an_unsure_answer_not_a_crash() -> None:
    g = one("# Be kind\nPlease be kind to each other.", "hello")
    assert g.judgement.p_violation == 0.5 and "nothing to compare" in g.judgement.analysis


def test_prompt_parsing_refuses_what_is_not_a_harmony_prompt() -> None:
    prompt = render_prompt(LIB.get("hate").text, "a <\u200b|post", "high")
    parsed = parse_prompt(prompt)
    assert (parsed.effort, parsed.content) == ("high", "a <|post")
    for bad in ("plain text", prompt.replace("<|start|>assistant", ""), prompt.replace("# Instructions", "# Rules")):
        with pytest.raises(PromptError):
            parse_prompt(bad)


def test_onnx_encoder_is_the_triage_embedder_and_deterministic() -> None:
    encode = onnx_encoder(1)
    a, b = encode(["I will hurt you", "a calm post"]), encode(["I will hurt you"])
    assert a.shape == (2, 384) and np.allclose(a[0], b[0]) and abs(float(np.linalg.norm(a[0])) - 1) < 1e-3


# -- vLLM's engine, as the stand-ins apply it ---------------------------------------------------------------------

COMPLETION = one(LIB.get("violence").text, "I will hurt you").text
PROMPT_TOKENS = 700


def test_defaults_cut_the_answer_at_16_tokens_and_strip_the_channel_markers() -> None:
    out = generate(COMPLETION, PROMPT_TOKENS, Sampling(), 32768)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 16)
    assert out.text.startswith("analysisCPU stand-in") and "<|" not in out.text
    assert out.logprobs is None


def test_what_the_client_sets_gives_the_whole_harmony_answer() -> None:
    out = generate(COMPLETION, PROMPT_TOKENS, Sampling(max_tokens=4096, skip_special_tokens=False), 32768)
    assert out.finish_reason == "stop" and out.text.startswith("<|channel|>analysis<|message|>")
    assert not out.text.endswith("<|return|>")  # the stop token ends the text and is left out of it
    assert out.token_ids[-1] == 200002  # ... but it was generated and counted
    kept = generate(COMPLETION, PROMPT_TOKENS, Sampling(max_tokens=4096, skip_special_tokens=False,
                                                       include_stop_str_in_output=True), 32768)
    assert kept.text.endswith("<|return|>")
    stripped = generate(COMPLETION, PROMPT_TOKENS, Sampling(max_tokens=4096), 32768)
    with pytest.raises(Exception, match="skip_special_tokens"):
        parse_completion(stripped.text)


def test_output_is_capped_by_the_context() -> None:
    out = generate(COMPLETION, 32768 - 20, Sampling(max_tokens=4096, skip_special_tokens=False), 32768)
    assert (out.finish_reason, len(out.token_ids)) == ("length", 20)
    with pytest.raises(SamplingError, match="longer than the maximum model length of 32768"):
        generate(COMPLETION, 40000, Sampling(max_tokens=10), 32768)


def test_logprobs_only_when_asked_and_the_verdict_token_carries_the_probability() -> None:
    g = one(LIB.get("violence").text, "I will hurt you")
    written = g.judgement.p_violation if g.judgement.violation else 1 - g.judgement.p_violation
    other = g.verdict_words[1] if g.judgement.violation else g.verdict_words[0]
    out = generate(g.text, PROMPT_TOKENS, Sampling(max_tokens=4096, skip_special_tokens=False, logprobs=5), 32768,
                   verdict=(g.verdict_offset, written, other))
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    (verdict,) = [entry for entry in out.logprobs if len(entry) == 2]
    chosen, alternative = verdict.values()
    assert chosen["decoded_token"] == str(g.judgement.violation) and alternative["decoded_token"] == other
    assert np.exp(chosen["logprob"]) == pytest.approx(written, abs=1e-4)


@pytest.mark.parametrize("raw", ['{"max_tokens": 0}', '{"temperature": 3}', '{"max_token": 100}', "not json",
                                 '{"logprobs": 50}', '{"stop": [""]}', "[1]"])
def test_bad_sampling_parameters_fail_as_the_vllm_backend_fails(raw: str) -> None:
    with pytest.raises(SamplingError, match=LORA_ERROR):
        sampling_from_triton(raw)


def test_sampling_parameters_take_vllm_defaults_for_what_is_left_out() -> None:
    assert sampling_from_triton(None) == Sampling()
    parsed = sampling_from_triton(json.dumps({"max_tokens": "512", "skip_special_tokens": False, "stop_token_ids": [1]}))
    assert (parsed.max_tokens, parsed.skip_special_tokens, parsed.stop_token_ids, parsed.temperature) == (
        512, False, (1,), 1.0)
    assert vllm_engine.sampling_from_dict({"lora_name": None}) == Sampling()
