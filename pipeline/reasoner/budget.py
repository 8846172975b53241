"""Fitting a call into the model's context: the output budget is kept, the content is cut if it must be.

The rule, recorded on every call it changes (``ReasonerCall.content_cut``):

1. Every call is sent with the output budget of its effort (``reasoner.max_tokens_low/medium/high``): a
   gpt-oss-safeguard answer is analysis plus final answer, and the guide advises lowering the effort rather than
   capping the output.
2. Prompt tokens + budget must fit ``reasoner.max_model_len``. When they do not, the content is cut to the tokens
   that fit: its first two thirds and its last third are kept around a marker saying how many tokens were cut.
   A cut content's "no violation" answer is not accepted on its own (the cut part was never read): the reasoner
   routes it to review; a violation found in the kept part still counts.
3. A policy and budget that leave fewer than :data:`MIN_CONTENT_TOKENS` for content are a configuration error,
   raised when the reasoner is built, not discovered call by call.

Token counts are o200k_harmony counts (gpt-oss's tokenizer, from ``quicktok``), else four characters per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.policies.model import count_tokens, o200k_encoding

MIN_CONTENT_TOKENS = 256
_MARKER = "\n[... {cut} tokens of the content were cut here to fit the model's context ...]\n"
_MARKER_TOKENS = 24  # the marker's own length, with room to spare


@dataclass(frozen=True)
class CallPlan:
    content: str  # what is sent (the content, or its cut version)
    max_tokens: int  # the output budget
    prompt_tokens: int  # the prompt's tokens as counted here (the backend's own count may differ slightly)
    content_cut: str | None = None  # how the content was cut, when it was


def cut_to_tokens(text: str, keep: int) -> tuple[str, str | None]:
    """``text`` cut to about ``keep`` tokens (head two thirds, tail one third, a marker between); note or None."""
    enc = o200k_encoding()
    keep = max(keep - _MARKER_TOKENS, 2)
    if enc is not None:
        ids = enc.encode_ordinary(text)
        if len(ids) <= keep:
            return text, None
        head, tail = keep * 2 // 3, keep - keep * 2 // 3
        cut = len(ids) - head - tail
        out = enc.decode(ids[:head]) + _MARKER.format(cut=cut) + enc.decode(ids[-tail:])
        return out, f"kept the first {head} and the last {tail} of {len(ids)} content tokens ({cut} cut)"
    chars = keep * 4
    if len(text) <= chars:
        return text, None
    head, tail = chars * 2 // 3, chars - chars * 2 // 3
    cut = len(text) - head - tail
    out = text[:head] + _MARKER.format(cut=f"~{cut // 4}") + text[-tail:]
    return out, f"kept the first {head} and the last {tail} of {len(text)} content characters (estimated tokens)"


def plan_call(overhead_tokens: int, content: str, budget: int, max_model_len: int) -> CallPlan:
    """The plan for one call. ``overhead_tokens``: the prompt without the content (policy, template)."""
    content_tokens = count_tokens(content)
    if overhead_tokens + content_tokens + budget <= max_model_len:
        return CallPlan(content, budget, overhead_tokens + content_tokens)
    room = max_model_len - overhead_tokens - budget
    if room < MIN_CONTENT_TOKENS:
        raise ValueError(
            f"policy prompt ({overhead_tokens} tokens) + output budget ({budget}) leave {room} tokens of a "
            f"{max_model_len}-token context for content; raise reasoner.max_model_len or lower the budget"
        )
    cut, note = cut_to_tokens(content, room)
    return CallPlan(cut, budget, overhead_tokens + count_tokens(cut), note)
