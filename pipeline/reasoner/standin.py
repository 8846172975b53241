"""The CPU stand-in for gpt-oss-safeguard: what it "thinks", free of any server so it can be tested on its own.

This is NOT gpt-oss-safeguard and not a language model. It exists so the pipeline can run locally and in CI
against exactly the real model's wire protocols while still *reading the policy it is given*: the Triton model
``triton_repo/cpu/safeguard_standin_cpu`` and the HTTP fakes of ``vllm serve`` and Ollama
(:mod:`pipeline.reasoner.fake_servers`) all answer from :class:`StandinJudge`.

It reads the policy text the way the project reads policies (:mod:`pipeline.policies.model`: rule ids in any of
the guide's forms, labels from headings, ``Output:`` lines or tiers, examples in any answer format) and the answer
format the text asks for (:func:`pipeline.policies.formats.detect_format`: it sees only the prompt, as the model
does), and scores the content by sentence-embedding similarity (all-MiniLM-L6-v2, the project's int8 ONNX build:
the local stack spends its CPU on triage, as production would) to each rule's evidence. Effort chooses how much
evidence it looks at:

* low    -- rule definitions only (each rule's text and its ``;``-separated clauses);
* medium -- plus the policy's examples, as extra evidence for the rules they cite;
* high   -- medium plus a similarity-weighted k-nearest-neighbour vote over all evidence.

The probability of a violation comes from the margin between the best violating and the best safe rule; the
self-reported confidence is that probability rounded (a model's self-report is coarser than its token
probabilities), and the verdict token's log-probability carries the exact value, so the reasoner's
logprob read-out is exercised end to end.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.policies.formats import AnswerFormat, detect_format
from pipeline.policies.model import Rule, iter_sections, parse_rules, policy_title, read_examples, section_label
from pipeline.reasoner.harmony import parse_messages

logger = logging.getLogger(__name__)

STANDIN_NAME = "safeguard_standin_cpu"
STANDIN_NOTICE = "CPU stand-in for gpt-oss-safeguard (embedding similarity, not a language model)"
RELEVANCE_FLOOR = 0.22  # below this, no violating rule is about the content at all
MARGIN_SCALE = 0.15  # margin 0.1 -> confidence ~0.79; the similarity margin is a weak signal
KNN_K = 5
_WORD_CONFIDENCE = re.compile(r'"confidence"\s*:\s*"?\s*(?:low|medium|high)', re.IGNORECASE)

Encode = Callable[[Sequence[str]], np.ndarray]


class PromptError(ValueError):
    """The prompt is not a harmony prompt the stand-in can judge (the Triton model answers an error response)."""


@dataclass(frozen=True)
class ParsedPrompt:
    effort: str
    policy_text: str
    content: str


@dataclass
class PolicyIndex:
    """Embedded evidence for one policy text, at every effort level (cached by the policy text)."""

    title: str
    fmt: AnswerFormat
    rules: dict[str, Rule]
    n_examples: int
    word_confidence: bool
    texts: list[str] = field(default_factory=list)
    rule_of: list[str] = field(default_factory=list)  # evidence row -> rule id ("" for a rule-less section line)
    label_of: list[int] = field(default_factory=list)
    is_example: list[bool] = field(default_factory=list)
    vectors: np.ndarray | None = None


@dataclass(frozen=True)
class Judgement:
    violation: int
    p_violation: float  # the stand-in's probability of a violation (its verdict token carries it)
    confidence: float  # the self-report (rounded)
    rule_ids: list[str]
    rationale: str
    analysis: str
    escalate: bool = False


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Effort, policy and content of a harmony prompt (system, developer, user, then ``<|start|>assistant``)."""
    if not prompt.rstrip().endswith("<|start|>assistant"):
        raise PromptError("harmony prompt must end with '<|start|>assistant'")
    messages = {m.role: m.body for m in parse_messages(prompt) if m.role in ("system", "developer", "user")}
    for role in ("system", "developer", "user"):
        if role not in messages:
            raise PromptError(f"harmony prompt has no {role} message")
    effort = re.search(r"^Reasoning:\s*(low|medium|high)\s*$", messages["system"], re.MULTILINE)
    developer = messages["developer"]
    if not developer.startswith("# Instructions"):
        raise PromptError("developer message must start with '# Instructions'")
    policy_text = developer[len("# Instructions"):].strip()
    if not policy_text:
        raise PromptError("developer message holds no policy")
    content = messages["user"].replace("<\u200b|", "<|")  # undo the client's neutralisation for reading
    return ParsedPrompt(effort.group(1) if effort else "medium", policy_text, content)


def _rule_clauses(text: str) -> list[str]:
    """A rule's whole text plus its clauses: 'Label: a, b; c' -> ['Label: a, b; c', 'a, b', 'c']."""
    body = text.split(":", 1)[1] if ":" in text else text
    clauses = [c.strip(" .\"'\u201c\u201d") for c in re.split(r";|, or |, such as | \u2013 | - ", body)]
    return [text] + [c for c in clauses if len(c.split()) >= 2 and c != text]


def build_index(policy_text: str, encode: Encode) -> PolicyIndex:
    fmt = detect_format(policy_text)
    rules = {r.rule_id: r for r in parse_rules(policy_text, fmt)}
    examples, _ = read_examples(policy_text, fmt, strict=False)
    index = PolicyIndex(policy_title(policy_text) or "policy", fmt, rules, len(examples),
                        bool(_WORD_CONFIDENCE.search(policy_text)))

    def add(text: str, rule_id: str, label: int, example: bool) -> None:
        index.texts.append(text)
        index.rule_of.append(rule_id)
        index.label_of.append(label)
        index.is_example.append(example)

    for rule in rules.values():
        for clause in _rule_clauses(rule.text):
            add(clause, rule.rule_id, rule.label, False)
    if not rules:  # a policy without rule ids: its labelled sections' lines are the evidence
        for section in iter_sections(policy_text):
            label = section_label(section.name)
            if label is None:
                continue
            for line in section.body.splitlines():
                line = line.strip(" -*\u2022\t")
                if len(line.split()) >= 3:
                    add(line, "", label, False)
    for ex in examples:
        cited = [r for r in ex.rule_ids if r in rules and rules[r].label == ex.label]
        for rule_id in cited or ([""] if not rules else []):
            add(ex.text, rule_id, ex.label, True)
    index.vectors = encode(index.texts) if index.texts else np.zeros((0, 1), dtype=np.float32)
    return index


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def judge(index: PolicyIndex, content_vector: np.ndarray, effort: str) -> Judgement:
    """Score one content embedding (unit norm) against a policy's evidence at the given effort."""
    assert index.vectors is not None
    if not index.texts or not (set(index.label_of) >= {0, 1}):
        analysis = (f"{STANDIN_NOTICE} [{STANDIN_NAME}]. Policy '{index.title}': no violating and safe rules I can "
                    "read, so nothing to compare the content with.")
        return Judgement(0, 0.5, 0.5, [], "Stand-in: the policy gives no rules to compare against.", analysis)
    sims = index.vectors @ content_vector
    use = np.array([effort != "low" or not ex for ex in index.is_example])
    if not use.any():
        use = np.ones(len(index.texts), dtype=bool)
    per_key: dict[tuple[str, int], float] = {}
    for i, (rule_id, label) in enumerate(zip(index.rule_of, index.label_of)):
        if use[i]:
            key = (rule_id or f"#{i}", label)
            per_key[key] = max(per_key.get(key, -1.0), float(sims[i]))
    violating = sorted(((s, k[0]) for k, s in per_key.items() if k[1] == 1), reverse=True)
    safe = sorted(((s, k[0]) for k, s in per_key.items() if k[1] == 0), reverse=True)
    if not violating or not safe:
        violating = violating or [(-1.0, "")]
        safe = safe or [(-1.0, "")]
    best_v, best_s = violating[0], safe[0]
    margin = best_v[0] - best_s[0]
    read = "rule definitions only" if effort == "low" else "rule definitions + policy examples"
    notes = [f"effort {effort}: {read}"]
    if effort == "high":
        order = [i for i in np.argsort(-sims) if use[i]][:KNN_K]
        weights = [math.exp(float(sims[i]) / 0.05) for i in order]
        vote = sum(w * index.label_of[i] for w, i in zip(weights, order)) / sum(weights)
        margin = 0.5 * margin + 0.5 * (vote - 0.5) * 2 * MARGIN_SCALE
        neighbours = ", ".join(f"{index.rule_of[i] or 'line'} {sims[i]:.2f}" for i in order)
        notes.append(f"{KNN_K}-nearest evidence: {neighbours}; violating vote {vote:.2f}")
    if best_v[0] < RELEVANCE_FLOOR:
        p_violation = _sigmoid(-2 * (RELEVANCE_FLOOR - best_v[0]) / MARGIN_SCALE)
        cited_key = best_s[1] if best_s[0] >= RELEVANCE_FLOOR else ""
        notes.append(f"no violating rule is close (best {best_v[1] or 'line'} {best_v[0]:.2f} < floor "
                     f"{RELEVANCE_FLOOR})")
    else:
        p_violation = _sigmoid(2 * margin / MARGIN_SCALE)
        cited_key = best_v[1] if p_violation > 0.5 else best_s[1]
    violation = int(p_violation > 0.5)
    p_violation = min(max(p_violation, 0.005), 0.995)
    confidence = round(min(max(max(p_violation, 1 - p_violation), 0.5), 0.99), 2)
    cited = [cited_key] if cited_key in index.rules else []
    top_v = ", ".join(f"{r or 'line'} {s:.2f}" for s, r in violating[:3])
    top_s = ", ".join(f"{r or 'line'} {s:.2f}" for s, r in safe[:3])
    analysis = (
        f"{STANDIN_NOTICE} [{STANDIN_NAME}]. Policy '{index.title}': {len(index.rules)} rules, "
        f"{index.n_examples} examples, answer as {index.fmt.describe()}. " + "; ".join(notes)
        + f". Closest violating evidence: {top_v}. Closest safe evidence: {top_s}. Margin {margin:+.3f} -> "
        f"violation={violation}, p={p_violation:.3f}."
    )
    chosen = cited[0] if cited else None
    if chosen:
        rationale = (f"Stand-in similarity: closest {'violating' if violation else 'safe'} rule {chosen} "
                     f"({index.rules[chosen].text.split(':')[0][:60]}), margin {margin:+.2f}.")
    else:
        rationale = "Stand-in similarity: the content is not close to any rule of this policy."
    escalate = bool(violation and chosen and index.rules[chosen].escalate)
    return Judgement(violation, round(p_violation, 4), confidence, cited, rationale, analysis, escalate)


def confidence_word(confidence: float) -> str:
    return "high" if confidence >= 0.85 else "medium" if confidence >= 0.65 else "low"


def render_final(j: Judgement, index: PolicyIndex) -> tuple[str, tuple[int, int], tuple[str, str]]:
    """The final answer in the policy's format, where its verdict sits, and (violation, safe) as written there."""
    fmt = index.fmt
    if fmt.kind == "label":
        word = fmt.violation_label if j.violation else fmt.safe_label
        extra = f" + {fmt.escalate_label}" if j.escalate and fmt.escalate_label else ""
        cite = f" ({j.rule_ids[0]})" if j.rule_ids else ""
        return f"{word}{extra}{cite}", (0, len(word)), (fmt.violation_label, fmt.safe_label)
    if fmt.kind == "binary":
        return str(j.violation), (0, 1), ("1", "0")
    answer: dict = {}
    for key in fmt.keys if fmt.kind == "json" else ("violation",):
        if key == "violation":
            answer[key] = j.violation
        elif key == "policy_category":
            answer[key] = j.rule_ids[0] if j.rule_ids else None
        elif key == "rule_ids":
            answer[key] = list(j.rule_ids)
        elif key == "confidence":
            answer[key] = confidence_word(j.confidence) if index.word_confidence else float(j.confidence)
        elif key == "rationale":
            answer[key] = j.rationale
    text = json.dumps(answer)
    at = text.index('"violation": ') + len('"violation": ')
    return text, (at, at + 1), ("1", "0")


def completion_text(analysis: str, final: str) -> str:
    """The harmony completion the stand-in "generates", end-of-turn token included (the engine removes it)."""
    return (f"<|channel|>analysis<|message|>{analysis}<|end|>"
            f"<|start|>assistant<|channel|>final<|message|>{final}<|return|>")


@dataclass(frozen=True)
class Generation:
    """One prompt's answer: the completion text and where its verdict is (for the verdict token's logprobs)."""

    text: str
    judgement: Judgement
    verdict_offset: int  # character offset of the verdict in ``text``
    verdict_words: tuple[str, str]


class StandinJudge:
    """Parse, index (cached per policy text) and judge a batch of prompts with one embedding call."""

    def __init__(self, encode: Encode, cache_size: int = 64):
        self._encode = encode
        self._cache: OrderedDict[str, PolicyIndex] = OrderedDict()
        self._cache_size = cache_size

    def index_for(self, policy_text: str) -> PolicyIndex:
        index = self._cache.get(policy_text)
        if index is None:
            index = build_index(policy_text, self._encode)
            self._cache[policy_text] = index
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(policy_text)
        return index

    def generate_many(self, prompts: Sequence[ParsedPrompt]) -> list[Generation]:
        indexes = [self.index_for(p.policy_text) for p in prompts]
        vectors = self._encode([p.content for p in prompts]) if prompts else []
        out = []
        for ix, vec, p in zip(indexes, vectors, prompts):
            j = judge(ix, vec, p.effort)
            final, span, words = render_final(j, ix)
            text = completion_text(j.analysis, final)
            out.append(Generation(text, j, len(text) - len("<|return|>") - len(final) + span[0], words))
        return out


def onnx_encoder(threads: int = 1) -> Encode:
    """The project's int8 ONNX all-MiniLM-L6-v2 (``pipeline.triage.embedders.OnnxEmbedder``), ``threads`` texts at
    once: the stand-in spends the CPU the way the triage worker does, not on a float32 torch model."""
    from pipeline.triage.embedders import OnnxEmbedder

    embedder = OnnxEmbedder(threads=threads)
    return lambda texts: embedder.encode(list(texts))
