"""The reasoning of the CPU stand-in for gpt-oss-safeguard, free of Triton so it can be tested on its own.

This is NOT gpt-oss-safeguard and not a language model. It exists so the pipeline can run locally and in CI
against exactly the real model's wire protocol (harmony text in, harmony channels out) while still *reading the
policy it is given*: it parses the developer message's rules (``**XX1.a** text``) and examples
(``Content: "..."`` / ``Answer: {...}``) and scores the user content by sentence-embedding similarity
(all-MiniLM-L6-v2) to each rule's evidence. Effort chooses how much evidence it looks at:

* low    -- rule definitions only (each rule's text and its ``;``-separated clauses);
* medium -- plus the policy's examples, as extra evidence for the rules they cite;
* high   -- medium plus a similarity-weighted k-nearest-neighbour vote over all evidence.

Confidence comes from the margin between the best violating and the best safe rule, so content that sits
between rules comes out unsure and the pipeline escalates it, as it would with the real model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)

STANDIN_NAME = "safeguard_standin_cpu"
STANDIN_NOTICE = "CPU stand-in for gpt-oss-safeguard (embedding similarity, not a language model)"

_MSG = re.compile(r"<\|start\|>(?P<role>\w+)(?:<\|channel\|>\w+)?<\|message\|>(?P<body>.*?)<\|end\|>", re.DOTALL)
_RULE_LINE = re.compile(r"^\s*[-*]\s*\*\*(?P<id>[A-Z]{2,4}\d+\.[a-z]+)\*\*\s*(?P<text>.+?)\s*$", re.MULTILINE)
_EXAMPLE = re.compile(r'^Content:\s*"(?P<text>.*)"\s*\nAnswer:\s*(?P<answer>\{.*\})\s*$', re.MULTILINE)
_SECTION = re.compile(r"^##\s+(?P<name>.+?)\s*$", re.MULTILINE)

RELEVANCE_FLOOR = 0.22  # below this, no violating rule is about the content at all
MARGIN_SCALE = 0.15  # margin 0.1 -> confidence ~0.79; the similarity margin is a weak signal
KNN_K = 5


class PromptError(ValueError):
    """The prompt is not a harmony prompt this stand-in can judge (becomes a Triton error response)."""


@dataclass(frozen=True)
class ParsedPrompt:
    effort: str
    policy_text: str
    content: str


@dataclass
class ParsedPolicy:
    title: str
    rules: dict[str, tuple[int, str]]  # rule id -> (label, text)
    examples: list[tuple[str, int, list[str]]]  # (text, label, cited rule ids)


@dataclass
class PolicyIndex:
    """Embedded evidence for one policy text, at every effort level (cached by the policy's hash)."""

    policy: ParsedPolicy
    texts: list[str] = field(default_factory=list)
    rule_of: list[str] = field(default_factory=list)  # evidence row -> rule id
    is_example: list[bool] = field(default_factory=list)
    vectors: np.ndarray | None = None


def parse_prompt(prompt: str) -> ParsedPrompt:
    """Pull effort, policy and content out of a harmony prompt; PromptError when it is not one."""
    messages = {m.group("role"): m.group("body") for m in _MSG.finditer(prompt)}
    for role in ("system", "developer", "user"):
        if role not in messages:
            raise PromptError(f"harmony prompt has no {role} message")
    if not prompt.rstrip().endswith("<|start|>assistant"):
        raise PromptError("harmony prompt must end with '<|start|>assistant'")
    effort = re.search(r"^Reasoning:\s*(low|medium|high)\s*$", messages["system"], re.MULTILINE)
    developer = messages["developer"]
    if not developer.startswith("# Instructions"):
        raise PromptError("developer message must start with '# Instructions'")
    policy_text = developer[len("# Instructions") :].strip()
    if not policy_text:
        raise PromptError("developer message holds no policy")
    content = messages["user"].replace("<\u200b|", "<|")  # undo the client's neutralisation for reading
    return ParsedPrompt(effort.group(1) if effort else "medium", policy_text, content)


def parse_policy(policy_text: str) -> ParsedPolicy:
    title_match = re.search(r"^#\s+(.+)$", policy_text, re.MULTILINE)
    matches = list(_SECTION.finditer(policy_text))
    sections: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(policy_text)
        sections[m.group("name").upper()] = policy_text[m.end() : end]
    rules: dict[str, tuple[int, str]] = {}
    for name, label in (("VIOLATES (1)", 1), ("SAFE (0)", 0)):
        for m in _RULE_LINE.finditer(sections.get(name, "")):
            rules[m.group("id")] = (label, m.group("text"))
    if not any(lbl == 1 for lbl, _ in rules.values()) or not any(lbl == 0 for lbl, _ in rules.values()):
        raise PromptError("policy defines no VIOLATES (1) and SAFE (0) rules with ids like '**XX1.a**'")
    examples: list[tuple[str, int, list[str]]] = []
    for m in _EXAMPLE.finditer(sections.get("EXAMPLES", "")):
        try:
            answer = json.loads(m.group("answer"))
            named = answer.get("rule_ids") or ([answer["policy_category"]] if answer.get("policy_category") else [])
            cited = [r for r in named if r in rules]
            examples.append((m.group("text"), int(answer["violation"]), cited))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # an example the stand-in cannot read is skipped, as a reader would
    return ParsedPolicy(title_match.group(1).strip() if title_match else "policy", rules, examples)


def _rule_clauses(text: str) -> list[str]:
    """A rule's whole text plus its clauses: 'Label: a, b; c' -> ['Label: a, b; c', 'a, b', 'c']."""
    body = text.split(":", 1)[1] if ":" in text else text
    clauses = [c.strip(" .\"'") for c in re.split(r";|, or |, such as ", body)]
    return [text] + [c for c in clauses if len(c.split()) >= 2 and c != text]


def build_index(policy: ParsedPolicy, encode: Callable[[Sequence[str]], np.ndarray]) -> PolicyIndex:
    index = PolicyIndex(policy)
    for rule_id, (_, text) in policy.rules.items():
        for clause in _rule_clauses(text):
            index.texts.append(clause)
            index.rule_of.append(rule_id)
            index.is_example.append(False)
    for text, label, cited in policy.examples:
        for rule_id in cited:
            if policy.rules[rule_id][0] == label:
                index.texts.append(text)
                index.rule_of.append(rule_id)
                index.is_example.append(True)
    index.vectors = encode(index.texts)
    return index


@dataclass(frozen=True)
class Judgement:
    violation: int
    confidence: float
    rule_ids: list[str]
    rationale: str
    analysis: str


def judge(index: PolicyIndex, content_vector: np.ndarray, effort: str) -> Judgement:
    """Score one content embedding (unit norm) against a policy's evidence at the given effort."""
    assert index.vectors is not None
    sims = index.vectors @ content_vector
    use = np.array([effort != "low" or not ex for ex in index.is_example])
    per_rule: dict[str, float] = {}
    for i, rule_id in enumerate(index.rule_of):
        if use[i]:
            per_rule[rule_id] = max(per_rule.get(rule_id, -1.0), float(sims[i]))
    rules = index.policy.rules
    violating = sorted(((s, r) for r, s in per_rule.items() if rules[r][0] == 1), reverse=True)
    safe = sorted(((s, r) for r, s in per_rule.items() if rules[r][0] == 0), reverse=True)
    best_v, best_s = violating[0], safe[0]
    margin = best_v[0] - best_s[0]
    notes = [f"effort {effort}: " + ("rule definitions only" if effort == "low" else "rule definitions + policy examples")]
    if effort == "high":
        order = [i for i in np.argsort(-sims) if use[i]][:KNN_K]
        weights = [math.exp(float(sims[i]) / 0.05) for i in order]
        vote = sum(w * rules[index.rule_of[i]][0] for w, i in zip(weights, order)) / sum(weights)
        margin = 0.5 * margin + 0.5 * (vote - 0.5) * 2 * MARGIN_SCALE
        neighbours = ", ".join(f"{index.rule_of[i]} {sims[i]:.2f}" for i in order)
        notes.append(f"{KNN_K}-nearest evidence: {neighbours}; violating vote {vote:.2f}")
    if best_v[0] < RELEVANCE_FLOOR:
        violation = 0
        confidence = 0.5 + 0.5 * math.tanh((RELEVANCE_FLOOR - best_v[0]) / MARGIN_SCALE)
        cited = [best_s[1]] if best_s[0] >= RELEVANCE_FLOOR else []
        notes.append(f"no violating rule is close (best {best_v[1]} {best_v[0]:.2f} < floor {RELEVANCE_FLOOR})")
    else:
        violation = int(margin > 0)
        confidence = 0.5 + 0.5 * math.tanh(abs(margin) / MARGIN_SCALE)
        cited = [best_v[1]] if violation else [best_s[1]]
    confidence = round(min(max(confidence, 0.5), 0.99), 2)
    top_v = ", ".join(f"{r} {s:.2f}" for s, r in violating[:3])
    top_s = ", ".join(f"{r} {s:.2f}" for s, r in safe[:3])
    analysis = (
        f"{STANDIN_NOTICE} [{STANDIN_NAME}]. Policy '{index.policy.title}': {len(rules)} rules, "
        f"{len(index.policy.examples)} examples. " + "; ".join(notes) + f". Closest VIOLATES rules: {top_v}. "
        f"Closest SAFE rules: {top_s}. Margin {margin:+.3f} -> violation={violation}, confidence {confidence:.2f}."
    )
    chosen = cited[0] if cited else None
    if chosen:
        rationale = (
            f"Stand-in similarity: closest {'violating' if violation else 'safe'} rule {chosen} "
            f"({rules[chosen][1].split(':')[0]}), margin {margin:+.2f}."
        )
    else:
        rationale = "Stand-in similarity: the content is not close to any rule of this policy."
    return Judgement(violation, confidence, cited, rationale, analysis)


def render_output(j: Judgement) -> tuple[str, str]:
    """The harmony completion, as (analysis part, final part); their concatenation is the full text."""
    answer = json.dumps(
        {
            "violation": j.violation,
            "policy_category": j.rule_ids[0] if j.rule_ids else None,
            "rule_ids": j.rule_ids,
            "confidence": float(j.confidence),
            "rationale": j.rationale,
        }
    )
    return (
        f"<|channel|>analysis<|message|>{j.analysis}<|end|>",
        f"<|start|>assistant<|channel|>final<|message|>{answer}<|return|>",
    )


class StandinReasoner:
    """Parse, index (cached per policy text) and judge a batch of prompts with one embedding call."""

    def __init__(self, encode: Callable[[Sequence[str]], np.ndarray], cache_size: int = 64):
        self._encode = encode
        self._cache: OrderedDict[int, PolicyIndex] = OrderedDict()
        self._cache_size = cache_size

    def index_for(self, policy_text: str) -> PolicyIndex:
        key = hash(policy_text)
        index = self._cache.get(key)
        if index is None:
            index = build_index(parse_policy(policy_text), self._encode)
            self._cache[key] = index
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return index

    def judge_many(self, prompts: Sequence[ParsedPrompt]) -> list[Judgement]:
        indexes = [self.index_for(p.policy_text) for p in prompts]
        vectors = self._encode([p.content for p in prompts])
        return [judge(ix, vec, p.effort) for ix, vec, p in zip(indexes, vectors, prompts)]
