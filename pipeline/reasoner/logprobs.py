"""The probability of the verdict, read from the token log-probabilities of the tokens that carry it.

A self-reported confidence is a sentence the model writes, not a probability (the guide says as much). Where the
backend returns log-probabilities (Triton's vLLM backend with ``return_logprobs`` and sampling parameter
``logprobs``; OpenAI-style ``logprobs``/``top_logprobs`` from ``vllm serve``; Ollama's ``logprobs``), the verdict's
probability is read the way Llama Guard scores "unsafe": at the token where the answer writes its verdict
(``1`` in ``"violation": 1``, ``INVALID``, a bare ``0``), the probability mass of the alternatives that spell a
violation against those that spell no violation.

Alternatives are matched by prefix (a label split into ``IN`` + ``VALID`` is decided at ``IN`` vs ``VALID``). When
only one side appears among the returned alternatives, the rest of the mass is taken to be the other side, which
errs towards "unsure" rather than towards a confident verdict.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.reasoner.answers import Answer


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, its log-probability and the top alternatives at its position."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


def _side(alternative: str, violation: str, safe: str) -> str | None:
    word = alternative.strip().strip("\"'`").lower()
    if not word:
        return None

    def matches(label: str) -> bool:
        return label.startswith(word) or word.startswith(label)

    v, s = matches(violation.lower()), matches(safe.lower())
    if v and not s:
        return "violation"
    if s and not v:
        return "safe"
    return None


def verdict_probability(tokens: Sequence[TokenLogprob] | None, final: str, answer: Answer) -> float | None:
    """P(violation) from the verdict token's alternatives; None when the tokens or the verdict cannot be found."""
    if not tokens or answer.verdict_span is None or not final:
        return None
    full = "".join(t.token for t in tokens)
    at = full.rfind(final)
    offset = 0
    if at < 0:
        stripped = final.strip()
        at, offset = full.rfind(stripped), final.find(stripped)
        if at < 0 or not stripped:
            return None
    position = at + answer.verdict_span[0] - offset
    cursor = 0
    chosen: TokenLogprob | None = None
    for token in tokens:
        if cursor <= position < cursor + len(token.token):
            chosen = token
            break
        cursor += len(token.token)
    if chosen is None:
        return None
    alternatives: dict[str, float] = {}
    for text, logprob in ((chosen.token, chosen.logprob), *chosen.top):
        alternatives[text] = max(logprob, alternatives.get(text, -math.inf))
    violation_word, safe_word = answer.verdict_words
    mass = {"violation": 0.0, "safe": 0.0}
    for text, logprob in alternatives.items():
        side = _side(text, violation_word, safe_word)
        if side is not None and math.isfinite(logprob):
            mass[side] += math.exp(logprob)
    v, s = mass["violation"], mass["safe"]
    if v == 0 and s == 0:
        return None
    if s == 0:
        p = v
    elif v == 0:
        p = 1 - s
    else:
        p = v / (v + s)
    return round(min(max(p, 0.0), 1.0), 6)
