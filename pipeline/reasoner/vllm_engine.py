"""What vLLM's engine does to the completion a model writes: the stand-ins apply it so they fail where vLLM would.

Read from vllm-project/vllm (``vllm/sampling_params.py``: defaults and ``_verify_args``; ``vllm/v1/engine/
detokenizer.py``: a stop token ends the text and is left out of it unless ``include_stop_str_in_output``; the
engine's length cap at ``max_model_len``) and triton-inference-server/vllm_backend
(``src/utils/vllm_backend_utils.py``: ``TritonSamplingParams.from_dict`` turns the ``sampling_parameters`` JSON
into ``SamplingParams``, coercing simple types; any exception, an unknown key included, makes it return None and
the request then fails with ``'NoneType' object has no attribute 'lora_name'``).

The defaults that matter to a harmony client: ``max_tokens`` 16, ``skip_special_tokens`` true (the channel markers
vanish from the text: ``analysis...assistantfinal{...}``), ``temperature`` 1.0, no ``logprobs``. gpt-oss's
generation config makes ``<|return|>``, ``<|endoftext|>`` and ``<|call|>`` end-of-sequence tokens.

Used by the Triton stand-in (``triton_repo/cpu/safeguard_standin_cpu``) and the HTTP fakes
(:mod:`pipeline.reasoner.fake_servers`). Not imitated: sampling itself (the stand-in writes one deterministic
completion whatever the temperature), ``n`` > 1, beam search, structured outputs, ``min_tokens``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from pipeline.policies.model import count_harmony_tokens, encode_harmony, o200k_encoding

GPT_OSS_EOS_IDS = (200002, 199999, 200012)  # generation_config.json eos_token_id: <|return|>, <|endoftext|>, <|call|>
OTHER_TOKEN_LOGPROB = -0.01  # the stand-in is nearly sure of every token but the verdict
# Keys SamplingParams accepts (vllm/sampling_params.py, plus the backend's lora_name); any other is a TypeError.
SAMPLING_KEYS = frozenset({
    "n", "presence_penalty", "frequency_penalty", "repetition_penalty", "temperature", "top_p", "top_k", "min_p",
    "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs",
    "detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output",
    "output_kind", "structured_outputs", "logit_bias", "allowed_token_ids", "extra_args", "bad_words",
    "thinking_token_budget", "flat_logprobs", "lora_name",
})
LORA_ERROR = "'NoneType' object has no attribute 'lora_name'"


class SamplingError(ValueError):
    """A request vLLM would refuse (the message is what the server says)."""


@dataclass(frozen=True)
class Sampling:
    """The SamplingParams fields the imitation honours, with vLLM's defaults."""

    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    logprobs: int | None = None

    def validate(self, max_logprobs: int = 20) -> None:
        """vLLM's ``_verify_args`` for these fields (its messages), plus the engine's ``max_logprobs`` bound."""
        if not 0.0 <= self.temperature <= 2.0:
            raise SamplingError(f"temperature must be in [0, 2], got {self.temperature}.")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise SamplingError(f"max_tokens must be at least 1, got {self.max_tokens}.")
        if self.logprobs is not None and self.logprobs != -1 and self.logprobs < 0:
            raise SamplingError(f"logprobs must be non-negative or -1, got {self.logprobs}.")
        if self.logprobs is not None and self.logprobs > max_logprobs:
            raise SamplingError(f"Requested sample logprobs of {self.logprobs}, which is greater than max allowed: "
                                f"{max_logprobs}")
        if any(not s for s in self.stop):
            raise SamplingError("stop cannot contain an empty string.")


def sampling_from_dict(params: dict[str, Any]) -> Sampling:
    """SamplingParams(**params) for the honoured fields; an unknown key is the TypeError vLLM raises."""
    unknown = set(params) - SAMPLING_KEYS
    if unknown:
        raise SamplingError(f"SamplingParams.__init__() got an unexpected keyword argument '{sorted(unknown)[0]}'")
    names = {f.name for f in fields(Sampling)}
    kwargs: dict[str, Any] = {}
    for key, value in params.items():
        if key not in names or value is None:
            continue
        if key == "stop":
            value = (value,) if isinstance(value, str) else tuple(value)
        elif key == "stop_token_ids":
            value = tuple(int(v) for v in value)
        elif key in ("max_tokens", "logprobs"):
            value = int(value)
        elif key in ("temperature", "top_p"):
            value = float(value)
        else:
            value = bool(value)
        kwargs[key] = value
    sampling = Sampling(**kwargs)
    sampling.validate()
    return sampling


def sampling_from_triton(raw: str | None) -> Sampling:
    """The vLLM backend's reading of the ``sampling_parameters`` input: absent is ``{}`` (every default); anything
    ``from_dict`` fails on (bad JSON, an unknown key, a value vLLM refuses) becomes the backend's AttributeError."""
    try:
        params = json.loads(raw) if raw else {}
        if not isinstance(params, dict):
            raise SamplingError("sampling_parameters is not a JSON object")
        return sampling_from_dict(params)
    except (ValueError, TypeError) as exc:
        raise SamplingError(LORA_ERROR) from exc


@dataclass(frozen=True)
class EngineOutput:
    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" or "length"
    logprobs: list[dict[int, dict]] | None  # per generated token: {token_id: {logprob, rank, decoded_token}}
    cumulative_logprob: float
    prompt_tokens: int


def count_prompt(prompt: str) -> int:
    """The prompt's tokens as vLLM counts them (special tokens allowed)."""
    return count_harmony_tokens(prompt)


def generate(completion: str, prompt_tokens: int, sampling: Sampling, max_model_len: int, *,
             verdict: tuple[int, float, str] | None = None) -> EngineOutput:
    """What the engine returns for a model that writes ``completion`` (harmony text, end-of-turn token included).

    ``verdict`` = (character offset of the verdict in ``completion``, probability of the written verdict, the
    other verdict's word): the verdict token's log-probabilities carry it. Raises SamplingError for a prompt
    longer than the context (vLLM's message).
    """
    enc = o200k_encoding()
    if enc is None:
        raise RuntimeError("the stand-in needs the o200k tokenizer (quicktok)")
    if prompt_tokens > max_model_len:
        raise SamplingError(f"The decoder prompt (length {prompt_tokens}) is longer than the maximum model length of "
                            f"{max_model_len}. Make sure that `max_model_len` is no smaller than the number of text "
                            "tokens.")
    ids = encode_harmony(completion) or []
    limit = max_model_len - prompt_tokens
    if sampling.max_tokens is not None:
        limit = min(limit, sampling.max_tokens)
    stops = set(sampling.stop_token_ids) | (set() if sampling.ignore_eos else set(GPT_OSS_EOS_IDS))
    pieces = [enc.decode_single_token_bytes(i) for i in ids]
    verdict_index, verdict_alt = None, None
    if verdict is not None:
        offset, cursor = verdict[0], 0
        for i, piece in enumerate(pieces):
            length = len(piece.decode("utf-8", errors="ignore"))
            if cursor <= offset < cursor + max(length, 1):
                verdict_index = i
                break
            cursor += length
        verdict_alt = enc.encode_ordinary(verdict[2])[0]
    generated: list[int] = []
    finish = "length"
    text_bytes = b""
    stop_hit = False
    for i, token in enumerate(ids):
        if len(generated) >= limit:
            break
        generated.append(token)
        if token in stops:
            finish, stop_hit = "stop", True
            break
        if not (sampling.skip_special_tokens and enc.is_special_token(token)):
            text_bytes += pieces[i]
        if sampling.stop:
            text = text_bytes.decode("utf-8", errors="ignore")
            found = [(text.find(s), s) for s in sampling.stop if s in text]
            if found:
                at, s = min(found)
                text_bytes = (text[: at + len(s)] if sampling.include_stop_str_in_output else text[:at]).encode()
                finish = "stop"
                break
    else:
        finish = "stop"
    if stop_hit and sampling.include_stop_str_in_output and not (sampling.skip_special_tokens
                                                                  and enc.is_special_token(generated[-1])):
        text_bytes += enc.decode_single_token_bytes(generated[-1])
    logprobs = None
    cumulative = 0.0
    if sampling.logprobs is not None:
        logprobs = []
        for i, token in enumerate(generated):
            decoded = "" if sampling.skip_special_tokens and enc.is_special_token(token) else \
                pieces[i].decode("utf-8", errors="replace")
            if i == verdict_index and verdict is not None and verdict_alt is not None:
                p = min(max(verdict[1], 1e-6), 1 - 1e-6)
                chosen_lp, other_lp = math.log(p), math.log(1 - p)
                entry = {token: {"logprob": chosen_lp, "rank": 1 if p >= 0.5 else 2, "decoded_token": decoded}}
                if sampling.logprobs > 0:
                    entry[verdict_alt] = {"logprob": other_lp, "rank": 2 if p >= 0.5 else 1,
                                          "decoded_token": enc.decode([verdict_alt])}
            else:
                chosen_lp = OTHER_TOKEN_LOGPROB
                entry = {token: {"logprob": chosen_lp, "rank": 1, "decoded_token": decoded}}
            cumulative += chosen_lp
            logprobs.append(entry)
    else:
        cumulative = OTHER_TOKEN_LOGPROB * len(generated)
    return EngineOutput(generated, text_bytes.decode("utf-8", errors="ignore"), finish, logprobs, cumulative,
                        prompt_tokens)


def split_channels(token_ids: list[int]) -> tuple[str, str, bool]:
    """(analysis, final, final_complete) of generated harmony tokens, as a chat server's harmony parser reads
    them (the ``vllm serve`` and Ollama fakes): a final channel only once its header is complete."""
    enc = o200k_encoding()
    assert enc is not None
    text = enc.decode(token_ids)
    analysis, final, complete = "", "", False
    if "<|channel|>analysis<|message|>" in text:
        analysis = text.split("<|channel|>analysis<|message|>", 1)[1].split("<|end|>", 1)[0]
    marker = "<|channel|>final<|message|>"
    if marker in text:
        final = text.split(marker, 1)[1]
        complete = any(t in final for t in ("<|return|>", "<|end|>")) or token_ids[-1] in GPT_OSS_EOS_IDS
        for t in ("<|return|>", "<|end|>", "<|call|>"):
            final = final.split(t, 1)[0]
    return analysis.strip(), final.strip(), complete
