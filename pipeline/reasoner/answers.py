"""Reading the final channel's answer in the format the policy declares (:mod:`pipeline.policies.formats`).

Nothing the model says is trusted blindly, but an answer in the policy's own format is a good answer: ``1`` for a
binary policy, ``INVALID`` for a VALID/INVALID policy and ``{"violation": 1, "policy_category": "SP2.a"}`` for a
policy that asks for exactly that carry no ``output_errors``. Every departure from the declared format (keys it
did not ask for, a value of the wrong type, an answer in another format, a code fence, prose around the JSON) is
listed in ``Answer.output_errors``, so the reasoner asks again at a higher effort instead of trusting it; an answer
from which no verdict can be read at all raises :class:`~pipeline.errors.ModelOutputError`.

Rule ids are checked against the policy: ids it does not define go to ``invalid_rule_ids`` (a known failure of
the model is citing rules that do not exist). ``verdict_span`` says where in the final text the verdict is
written, so its token's log-probability can be read (:mod:`pipeline.reasoner.logprobs`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.errors import ModelOutputError
from pipeline.policies.formats import JSON_KEYS, AnswerFormat, confidence_value
from pipeline.policies.model import RULE_ID

if TYPE_CHECKING:
    from pipeline.policies import Policy

_FENCE = re.compile(r"^```[a-zA-Z]*[ \t]*\n?(?P<body>.*?)\n?```$", re.DOTALL)
_PREFIX = re.compile(r"^(?:answer|output|final answer|label|classification)\s*:\s*", re.IGNORECASE)
_CONFIDENCE = re.compile(
    r"\bconfidence\b\s*[:=]?\s*(?P<value>very (?:low|high)|low|medium|moderate|high|\d+(?:\.\d+)?%?)", re.IGNORECASE
)
_RULE = re.compile(rf"\b{RULE_ID}\b")


@dataclass(frozen=True)
class Answer:
    violation: bool
    confidence: float | None
    rule_ids: list[str]
    invalid_rule_ids: list[str]
    rationale: str
    policy_category: str | None = None
    output_errors: list[str] = field(default_factory=list)
    escalate: bool = False  # the answer carries the policy's escalation word ("INVALID + ESCALATE")
    verdict_span: tuple[int, int] | None = None  # where the verdict is written in the final text given to parse
    verdict_words: tuple[str, str] = ("1", "0")  # how a violation / no violation is written at that place


def _unwrap(final: str) -> tuple[str, int, list[str]]:
    """The answer without code fence and 'Answer:' prefix, its offset in ``final``, and what was removed."""
    notes: list[str] = []
    start, text = 0, final
    lead = len(text) - len(text.lstrip())
    start, text = start + lead, text.strip()
    fenced = _FENCE.match(text)
    if fenced:
        notes.append("the answer is wrapped in a code fence")
        body = fenced.group("body")
        inner_lead = len(body) - len(body.lstrip())
        start, text = start + fenced.start("body") + inner_lead, body.strip()
    prefix = _PREFIX.match(text)
    if prefix:
        start, text = start + prefix.end(), text[prefix.end():]
    return text, start, notes


def _cited(policy: Policy, ids: list[str]) -> tuple[list[str], list[str]]:
    seen: list[str] = []
    for rule_id in (str(i).strip() for i in ids):
        if rule_id and rule_id not in seen:
            seen.append(rule_id)
    known = policy.rule_ids
    return [r for r in seen if r in known], [r for r in seen if r not in known]


def _escalates(fmt: AnswerFormat, text: str) -> bool:
    word = fmt.escalate_label
    return bool(word) and re.search(rf"\b{re.escape(word or '')}\b", text, re.IGNORECASE) is not None


def _to_violation(value: Any, fmt: AnswerFormat) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in ("0", "1", "true", "false"):
            return word in ("1", "true")
        if fmt.kind == "label" and word in (fmt.violation_label.lower(), fmt.safe_label.lower()):
            return word == fmt.violation_label.lower()
    raise ModelOutputError(f"'violation' is not 0/1: {str(value)[:40]!r}")


def _json_errors(data: dict, fmt: AnswerFormat) -> list[str]:
    """Departures from the JSON answer format the policy declares (its keys, the types the guide uses)."""
    declared = fmt.keys if fmt.kind == "json" else ("violation",)
    errors = [f"{key}: missing" for key in declared if key not in data]
    errors += [f"{key}: not part of the answer format" for key in data if key not in JSON_KEYS]
    value = data.get("violation")
    if "violation" in data and (isinstance(value, bool) or value not in (0, 1) or isinstance(value, float)):
        errors.append("violation: not the integer 0 or 1")
    category = data.get("policy_category")
    if category is not None and not isinstance(category, str):
        errors.append("policy_category: not a string or null")
    cited = data.get("rule_ids", [])
    if not (isinstance(cited, list) and all(isinstance(r, str) for r in cited)):
        errors.append("rule_ids: not a list of strings")
    if "confidence" in data:
        raw = data["confidence"]
        number = isinstance(raw, (int, float)) and not isinstance(raw, bool) and 0 <= raw <= 1
        word = isinstance(raw, str) and confidence_value(raw) is not None and not raw.strip()[0].isdigit()
        if not number and not word:
            errors.append("confidence: not a number from 0 to 1 or a word (low, medium, high)")
    if "rationale" in data:
        raw = data["rationale"]
        if not isinstance(raw, str) or not raw.strip() or len(raw) > 1000:
            errors.append("rationale: not a non-empty string of at most 1000 characters")
    return errors[:10]


def _verdict_span_json(final: str, value: Any) -> tuple[tuple[int, int] | None, tuple[str, str]]:
    m = None
    for m in re.finditer(r'"violation"\s*:\s*"?', final):
        pass  # the last one: an answer quoting an example comes before the real key
    if m is None:
        return None, ("1", "0")
    rest = final[m.end():]
    token = re.match(r"[A-Za-z0-9]+", rest)
    if token is None:
        return None, ("1", "0")
    words = ("true", "false") if isinstance(value, bool) else ("1", "0")
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        words = ("true", "false")
    return (m.end(), m.end() + token.end()), words


def _from_json(final: str, text: str, start: int, notes: list[str], policy: Policy) -> Answer | None:
    fmt = policy.answer_format
    data: Any = None
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        lo, hi = text.find("{"), text.rfind("}")
        if 0 <= lo < hi:
            try:
                data = json.loads(text[lo : hi + 1])
                notes = notes + ["text around the JSON object"]
            except json.JSONDecodeError:
                data = None
    if not isinstance(data, dict) or "violation" not in data:
        return None
    violation = _to_violation(data["violation"], fmt)
    category = data.get("policy_category")
    category = (str(category).strip() or None) if category is not None else None
    cited = data.get("rule_ids", [])
    if isinstance(cited, str):
        cited = [cited]
    if not isinstance(cited, list):
        cited = []
    rules, invalid = _cited(policy, [*cited, *([category] if category else [])])
    rationale = data.get("rationale", "")
    span, words = _verdict_span_json(final, data["violation"])
    errors = list(notes) + _json_errors(data, fmt)
    if fmt.kind != "json":
        errors.insert(0, f"answered with a JSON object; the policy asks for {fmt.describe()}")
    return Answer(
        violation=violation,
        confidence=confidence_value(data.get("confidence")),
        rule_ids=rules,
        invalid_rule_ids=invalid,
        rationale=rationale if isinstance(rationale, str) else json.dumps(rationale),
        policy_category=category,
        output_errors=errors,
        escalate=_escalates(fmt, json.dumps(data)) or bool(data.get("escalate") is True),
        verdict_span=span,
        verdict_words=words,
    )


def _loose_fields(text: str, policy: Policy) -> tuple[list[str], list[str], float | None]:
    rules, invalid = _cited(policy, _RULE.findall(text))
    confidence = _CONFIDENCE.search(text)
    return rules, invalid, confidence_value(confidence.group("value")) if confidence else None


def _from_label(final: str, text: str, start: int, notes: list[str], policy: Policy,
                fmt: AnswerFormat) -> Answer | None:
    v = re.search(rf"\b{re.escape(fmt.violation_label)}\b", text, re.IGNORECASE)
    s = re.search(rf"(?<![A-Za-z]){re.escape(fmt.safe_label)}\b", text, re.IGNORECASE)
    if v is None and s is None:
        return None
    hit = v if v is not None and (s is None or v.start() <= s.start()) else s
    assert hit is not None
    rules, invalid, confidence = _loose_fields(text, policy)
    rest = (text[: hit.start()] + text[hit.end():]).strip(" \t\n-:–—.()[]+")
    if fmt.escalate_label:
        rest = re.sub(rf"\b{re.escape(fmt.escalate_label)}\b", "", rest, flags=re.IGNORECASE).strip(" \t\n-:–—.()[]+")
    errors = list(notes)
    if policy.answer_format.kind != "label":
        errors.insert(0, f"answered with a label word; the policy asks for {policy.answer_format.describe()}")
    return Answer(
        violation=hit is v, confidence=confidence, rule_ids=rules, invalid_rule_ids=invalid, rationale=rest[:1000],
        output_errors=errors, escalate=_escalates(fmt, text),
        verdict_span=(start + hit.start(), start + hit.end()), verdict_words=(fmt.violation_label, fmt.safe_label),
    )


def _from_binary(final: str, text: str, start: int, notes: list[str], policy: Policy) -> Answer | None:
    m = re.match(r"^[\s\"'`]*(?P<digit>[01])(?![\d.])", text)
    if m is None:
        return None
    rest = text[m.end():].strip(" \t\n\"'`-:–—.()")
    rules, invalid, confidence = _loose_fields(rest, policy)
    errors = list(notes)
    if policy.answer_format.kind != "binary":
        errors.append("a bare 0/1, not the JSON object" if policy.answer_format.kind == "json"
                      else f"answered 0/1; the policy asks for {policy.answer_format.describe()}")
    return Answer(
        violation=m.group("digit") == "1", confidence=confidence, rule_ids=rules, invalid_rule_ids=invalid,
        rationale=rest[:1000], output_errors=errors, escalate=_escalates(policy.answer_format, rest),
        verdict_span=(start + m.start("digit"), start + m.end("digit")), verdict_words=("1", "0"),
    )


def parse_answer(final: str, policy: Policy) -> Answer:
    """Read the final channel's answer in the policy's declared format, falling back to the others.

    Raises :class:`ModelOutputError` when no verdict can be read, and for a format this reasoner cannot read
    (the reasoner checks that before calling the model).
    """
    fmt = policy.answer_format
    if not fmt.supported:
        raise ModelOutputError(f"policy {policy.policy_id} declares answer format {fmt.kind!r}, which is not readable")
    text, start, notes = _unwrap(final)
    if not text:
        raise ModelOutputError("final answer is empty")
    readers = {
        "json": (lambda: _from_json(final, text, start, notes, policy),
                 lambda: _from_binary(final, text, start, notes, policy)),
        "label": (lambda: _from_label(final, text, start, notes, policy, fmt),
                  lambda: _from_json(final, text, start, notes, policy),
                  lambda: _from_binary(final, text, start, notes, policy)),
        "binary": (lambda: _from_binary(final, text, start, notes, policy),
                   lambda: _from_json(final, text, start, notes, policy)),
    }[fmt.kind]
    for read in readers:
        answer = read()
        if answer is not None:
            return answer
    expected = {"json": "a JSON object with 'violation'", "label": f"{fmt.violation_label} or {fmt.safe_label}",
                "binary": "0 or 1"}[fmt.kind]
    raise ModelOutputError(f"final answer is not {expected} ({len(final)} chars)")
