"""Answers in each policy's own format, and the verdict's probability from token log-probabilities."""

from __future__ import annotations

import dataclasses
import math

import pytest

from pipeline.config import PROJECT_ROOT
from pipeline.errors import ModelOutputError
from pipeline.policies import PolicyLibrary
from pipeline.policies.formats import AnswerFormat, confidence_value, detect_format, format_from_metadata
from pipeline.policies.model import parse_rules
from pipeline.reasoner.answers import parse_answer
from pipeline.reasoner.logprobs import TokenLogprob, verdict_probability

pytestmark = pytest.mark.unit
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
VIOLENCE = LIB.get("violence")


def with_format(fmt: AnswerFormat, text: str | None = None):  # type: ignore[no-untyped-def]
    policy = VIOLENCE if text is None else dataclasses.replace(VIOLENCE, text=text, rules=parse_rules(text, fmt))
    return dataclasses.replace(policy, answer_format=fmt)


LABEL = AnswerFormat("label", (), "INVALID", "VALID", "ESCALATE")
BINARY = AnswerFormat("binary", ())
CATEGORY = AnswerFormat("json", ("violation", "policy_category"))
WORDS = AnswerFormat("json", ("violation", "rule_ids", "confidence", "rationale"))


@pytest.mark.parametrize("final,violation,escalate,rules", [
    ("INVALID", True, False, []),
    ("VALID", False, False, []),
    ("INVALID + ESCALATE (VI1.a)", True, True, ["VI1.a"]),
    ("valid (VI0.a): an idiom about software", False, False, ["VI0.a"]),
    ("Answer: INVALID", True, False, []),
])
def test_label_answers_are_whole_answers(final: str, violation: bool, escalate: bool, rules: list[str]) -> None:
    a = parse_answer(final, with_format(LABEL))
    assert (a.violation, a.escalate, a.rule_ids, a.output_errors) == (violation, escalate, rules, [])
    assert a.verdict_words == ("INVALID", "VALID")
    assert final[a.verdict_span[0]:a.verdict_span[1]].upper() in ("INVALID", "VALID")  # type: ignore[index]


@pytest.mark.parametrize("final,violation", [("1", True), ("0", False), ("`1`", True), ("0 (VI0.b)", False)])
def test_binary_answers_carry_no_format_errors(final: str, violation: bool) -> None:
    a = parse_answer(final, with_format(BINARY))
    assert a.violation is violation and a.output_errors == [] and a.confidence is None


def test_policy_referencing_json_needs_only_its_declared_keys() -> None:
    a = parse_answer('{"violation": 1, "policy_category": "VI1.b"}', with_format(CATEGORY))
    assert a.violation and a.rule_ids == ["VI1.b"] and a.output_errors == [] and a.confidence is None
    missing = parse_answer('{"violation": 1}', with_format(CATEGORY))
    assert missing.output_errors == ["policy_category: missing"]
    extra = parse_answer('{"violation": 1, "policy_category": "VI1.b", "severity": "high"}', with_format(CATEGORY))
    assert extra.output_errors == ["severity: not part of the answer format"]


@pytest.mark.parametrize("word,value", [("low", 0.25), ("medium", 0.55), ("high", 0.9), ("HIGH", 0.9), ("very high", 0.97)])
def test_confidence_as_a_word(word: str, value: float) -> None:
    a = parse_answer(f'{{"violation": 0, "rule_ids": ["VI0.a"], "confidence": "{word}", "rationale": "x"}}',
                     with_format(WORDS))
    assert a.confidence == value and a.output_errors == []


@pytest.mark.parametrize("raw,value", [(0.8, 0.8), (85, 0.85), ("85%", 0.85), ("0.7", 0.7), (None, None), ("sure", None),
                                       (True, None), (150, None)])
def test_confidence_numbers(raw: object, value: float | None) -> None:
    assert confidence_value(raw) == value


def test_an_answer_in_another_format_is_read_but_flagged() -> None:
    a = parse_answer('{"violation": 1, "policy_category": "VI1.a"}', with_format(LABEL))
    assert a.violation and a.output_errors[0].startswith("answered with a JSON object; the policy asks for a label")
    b = parse_answer("1", with_format(LABEL))
    assert b.violation and "answered 0/1" in b.output_errors[0]


@pytest.mark.parametrize("final", ["maybe", "", "INVALIDATED", "{}"])
def test_a_label_policy_answer_without_its_words_fails(final: str) -> None:
    with pytest.raises(ModelOutputError):
        parse_answer(final, with_format(LABEL))


def test_unsupported_format_cannot_be_parsed() -> None:
    with pytest.raises(ModelOutputError, match="not readable"):
        parse_answer("1", with_format(AnswerFormat("xml", ())))


def test_format_detection_from_the_text() -> None:
    assert detect_format(VIOLENCE.text).keys == ("violation", "policy_category", "rule_ids", "confidence", "rationale")
    assert detect_format("Label each post VALID or INVALID. Output: INVALID + ESCALATE for fraud.").kind == "label"
    assert detect_format("Label each post VALID or INVALID.").escalate_label is None
    assert detect_format("Answer with a single digit: 1 if it breaks the rules, 0 if not.").kind == "binary"
    assert detect_format('Reply {"violation": 1, "policy_category": "X1.a"}').keys == ("violation", "policy_category")
    assert detect_format("Be nice.").source == "default"
    assert detect_format("Return 1 if the post is spam, 0 otherwise.").kind == "binary"
    assert detect_format("Output 0 when it is fine and 1 if not.").kind == "binary"
    assert detect_format("Output: 1 (violating) or 0 (non-violating).").kind == "binary"
    assert detect_format("Return exactly one character: 0 or 1. No explanation.").kind == "binary"
    assert detect_format("Section 1 covers ads; section 0 is the preface.").source == "default"
    assert detect_format("## VIOLATES (1)\n- X1.a ads\n## SAFE (0)\n- X0.a chat\n").kind == "binary"
    assert detect_format('## VIOLATES (1)\n## SAFE (0)\nReply {"violation": 1}').kind == "json"  # JSON wins
    assert format_from_metadata({"format": "label", "violation": "UNSAFE", "safe": "SAFE"}, "").label_words() == (
        "UNSAFE", "SAFE")
    assert not format_from_metadata({"format": "xml"}, "").supported
    with pytest.raises(ValueError, match="needs the words"):
        format_from_metadata({"format": "label"}, "")
    with pytest.raises(ValueError, match="unknown keys"):
        format_from_metadata({"format": "json", "schema": "x"}, "")


# -- the verdict's probability ---------------------------------------------------------------------------------


def tokens(*parts: tuple[str, float, dict[str, float]]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t, lp, tuple(top.items())) for t, lp, top in parts)


def test_probability_from_the_json_verdict_token() -> None:
    final = '{"violation": 1, "policy_category": "VI1.a"}'
    a = parse_answer(final, with_format(CATEGORY))
    lp = tokens(("analysis text", -0.01, {}), ('{"', -0.01, {}), ("violation", -0.01, {}), ('":', -0.01, {}),
                (" ", -0.01, {}), ("1", math.log(0.8), {"0": math.log(0.15), "2": math.log(0.01)}),
                (', "policy_category": "VI1.a"}', -0.01, {}))
    assert verdict_probability(lp, final, a) == pytest.approx(0.8 / 0.95, abs=1e-6)


def test_probability_of_a_label_split_into_tokens() -> None:
    final = "INVALID (VI1.a)"
    a = parse_answer(final, with_format(LABEL))
    lp = tokens(("IN", math.log(0.6), {"VALID": math.log(0.4)}), ("VALID", -0.001, {}), (" (VI1.a)", -0.01, {}))
    assert verdict_probability(lp, final, a) == pytest.approx(0.6, abs=1e-6)


def test_only_one_side_among_the_alternatives_leaves_the_rest_to_the_other() -> None:
    final = "0"
    a = parse_answer(final, with_format(BINARY))
    assert verdict_probability(tokens(("0", math.log(0.7), {"The": math.log(0.2)})), final, a) == pytest.approx(0.3)


def test_no_probability_without_tokens_or_when_the_answer_is_not_in_them() -> None:
    a = parse_answer("1", with_format(BINARY))
    assert verdict_probability(None, "1", a) is None
    assert verdict_probability(tokens(("something else", -0.1, {})), "1", a) is None
