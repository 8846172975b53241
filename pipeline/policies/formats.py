"""A policy's answer format: what it asks the model to write in the final channel.

The gpt-oss-safeguard guide shows several output formats, from cheapest to most useful, and real policies use all
of them; a policy must work in the format its author wrote, so the format is part of the policy:

* ``binary``: a single ``0`` or ``1``;
* ``label``: one word per outcome, e.g. ``VALID`` / ``INVALID`` (the guide's sample spam policy), optionally with an
  escalation word (``INVALID + ESCALATE``);
* ``json``: a JSON object with ``violation`` and any of ``policy_category``, ``rule_ids``, ``confidence`` (a number
  or a word: low / medium / high) and ``rationale`` (the guide's policy-referencing answers).

``metadata.toml`` declares it in an ``[answer]`` table (``modpipe policy import`` writes the one it detected);
without one it is detected from the policy text (:func:`detect_format`), the way the model itself reads it. Any
other ``format`` value is kept as declared and is unsupported: lint warns, and the reasoner fails every call for
that policy closed, with the reason, instead of guessing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

KINDS = ("json", "label", "binary")
JSON_KEYS = ("violation", "policy_category", "rule_ids", "confidence", "rationale")
# Known outcome words, violation first: matched as whole upper-case words in the policy text.
LABEL_PAIRS = (("INVALID", "VALID"), ("UNSAFE", "SAFE"))
ESCALATE_WORD = "ESCALATE"
# Self-reported confidence given as a word: mapped onto the 0-1 scale min_confidence is set on. "medium" stays
# below the default bar (0.6), so a model that is only moderately sure gets a second look.
CONFIDENCE_WORDS = {"very low": 0.1, "low": 0.25, "medium": 0.55, "moderate": 0.55, "high": 0.9, "very high": 0.97}

_JSON_KEY = re.compile(r'"(?P<key>[a-z_]+)"\s*:')
_BINARY = re.compile(
    r"\b(?:answer|output|return|respond|reply|label|classify)\w*\b[^\n]{0,60}?"
    r"(?:\b0\b[^\n]{0,30}?\b1\b|\b1\b[^\n]{0,30}?\b0\b)"
    r"|\(0\s*(?:or|/|\|)\s*1\)|\b0\s*/\s*1\b|\b(?:0 or 1|1 or 0)\b|\bsingle digit\b"
    r"|\b1 if\b[^\n]{0,120}\b0 if\b|\b0 if\b[^\n]{0,120}\b1 if\b"
    # "Return 1 if it violates, 0 otherwise" / "... 0 if not": one condition, the other digit for the rest.
    r"|\b[01] (?:if|when)\b[^\n]{0,120}?\b[01]\b[ \t]*(?:otherwise|if not|else|for everything else)\b",
    re.IGNORECASE,
)
# The guide's cookbook headings for a binary policy, "VIOLATES (1)" and "SAFE (0)" (or "DOES NOT VIOLATE (0)"):
# with no JSON keys and no outcome words in the text, they say the answer is the digit.
_BINARY_HEADINGS = (
    re.compile(r"\bVIOLAT\w*[ \t]*\(1\)", re.IGNORECASE),
    re.compile(r"\b(?:SAFE|NOT[ \t]+VIOLAT\w*|NON[- ]?VIOLAT\w*|ALLOWED|ACCEPTABLE)[ \t]*\(0\)", re.IGNORECASE),
)
_BINARY_EXAMPLE = re.compile(
    r"^[ \t]*(?:\*\*)?(?:Answer|Output|Label)(?:\*\*)?:[ \t]*[01][ \t]*$", re.MULTILINE | re.IGNORECASE
)


@dataclass(frozen=True)
class AnswerFormat:
    """How the final answer of a policy is written (see the module docstring)."""

    kind: str = "json"
    keys: tuple[str, ...] = JSON_KEYS  # json: the keys the policy asks for
    violation_label: str = "INVALID"  # label: the word for a violation
    safe_label: str = "VALID"  # label: the word for no violation
    escalate_label: str | None = None  # label/json: a word that sends the item to people ("INVALID + ESCALATE")
    source: str = "default"  # "metadata", "detected" or "default" (nothing in the text said)
    notes: tuple[str, ...] = field(default=(), compare=False)  # why detection chose this (shown by import and lint)

    @property
    def supported(self) -> bool:
        return self.kind in KINDS

    @property
    def asks_confidence(self) -> bool:
        return self.kind == "json" and "confidence" in self.keys

    @property
    def asks_rules(self) -> bool:
        """The format asks the model to name the deciding rule(s)."""
        return self.kind == "json" and bool({"policy_category", "rule_ids"} & set(self.keys))

    def label_words(self) -> tuple[str, str]:
        """(violation, safe) as the model writes them, for the logprob read-out of the verdict token."""
        if self.kind == "label":
            return self.violation_label, self.safe_label
        return "1", "0"

    def describe(self) -> str:
        if self.kind == "json":
            return "JSON with " + ", ".join(self.keys)
        if self.kind == "label":
            extra = f", {self.escalate_label} to escalate" if self.escalate_label else ""
            return f"a label: {self.violation_label} (violation) / {self.safe_label} (no violation){extra}"
        if self.kind == "binary":
            return "a single 0 or 1"
        return f"unsupported format {self.kind!r}"

    def to_toml(self) -> str:
        """The ``[answer]`` table that declares this format in metadata.toml."""
        lines = ["[answer]", f'format = "{self.kind}"']
        if self.kind == "json":
            lines.append("keys = [" + ", ".join(f'"{k}"' for k in self.keys) + "]")
        if self.kind == "label":
            lines += [f'violation = "{self.violation_label}"', f'safe = "{self.safe_label}"']
        if self.escalate_label:
            lines.append(f'escalate = "{self.escalate_label}"')
        return "\n".join(lines) + "\n"


def detect_format(text: str) -> AnswerFormat:
    """The answer format a policy text asks for, read the way a model reads it.

    In order: a JSON object with a ``"violation"`` key; known outcome words (``INVALID``/``VALID``,
    ``UNSAFE``/``SAFE``) used as outputs; an instruction to answer ``0`` or ``1``. Nothing found: the project's own
    JSON format (source ``default``), which lint points out.
    """
    keys_seen = [m.group("key") for m in _JSON_KEY.finditer(text)]
    if "violation" in keys_seen:
        keys = tuple(k for k in JSON_KEYS if k in keys_seen)
        escalate = ESCALATE_WORD if re.search(rf"\b{ESCALATE_WORD}\b", text) else None
        return AnswerFormat("json", keys, escalate_label=escalate, source="detected",
                            notes=(f'a JSON answer with keys {", ".join(keys)}',))
    for violation, safe in LABEL_PAIRS:
        uses_v = re.search(rf"\b{violation}\b", text)
        uses_s = re.search(rf"(?<![A-Z]){safe}\b", text)
        if uses_v and uses_s and _used_as_output(text, violation, safe):
            escalate = ESCALATE_WORD if re.search(rf"\b{ESCALATE_WORD}\b", text) else None
            return AnswerFormat("label", (), violation, safe, escalate, source="detected",
                                notes=(f"outcome words {violation} / {safe}",))
    if _BINARY.search(text) or len(_BINARY_EXAMPLE.findall(text)) >= 2:
        return AnswerFormat("binary", (), source="detected", notes=("an answer of 0 or 1",))
    if all(heading.search(text) for heading in _BINARY_HEADINGS):
        return AnswerFormat("binary", (), source="detected",
                            notes=("sections headed VIOLATES (1) / SAFE (0) and no other answer format",))
    return AnswerFormat(source="default", notes=("no answer format stated; the project's JSON format assumed",))


def _used_as_output(text: str, violation: str, safe: str) -> bool:
    """The words appear as answers (after 'Output:'/'Answer:'/'as', or alone on a line), not only in headings."""
    pattern = rf"(?:output|answer|label|classify|reply|respond|return)[^\n]{{0,80}}?\b(?:{violation}|{safe})\b"
    return bool(re.search(pattern, text, re.IGNORECASE))


def format_from_metadata(table: Any, text: str) -> AnswerFormat:
    """The format an ``[answer]`` table declares (ValueError naming the problem); no table: :func:`detect_format`."""
    if table is None:
        return detect_format(text)
    if not isinstance(table, dict):
        raise ValueError("[answer] must be a table")
    unknown = set(table) - {"format", "keys", "violation", "safe", "escalate"}
    if unknown:
        raise ValueError(f"[answer] has unknown keys {', '.join(sorted(unknown))}")
    kind = table.get("format")
    if not isinstance(kind, str) or not kind:
        raise ValueError("[answer] needs a string 'format' (json, label or binary)")
    escalate = table.get("escalate")
    if escalate is not None and not isinstance(escalate, str):
        raise ValueError("[answer] escalate must be a string")
    if kind == "json":
        keys = table.get("keys", list(JSON_KEYS))
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys) or "violation" not in keys:
            raise ValueError("[answer] keys must be a list of strings that includes 'violation'")
        return AnswerFormat("json", tuple(keys), escalate_label=escalate, source="metadata")
    if kind == "label":
        violation, safe = table.get("violation"), table.get("safe")
        if not isinstance(violation, str) or not isinstance(safe, str) or not violation or not safe:
            raise ValueError("[answer] format 'label' needs the words: violation = \"...\", safe = \"...\"")
        if violation.upper() == safe.upper():
            raise ValueError("[answer] violation and safe words must differ")
        return AnswerFormat("label", (), violation, safe, escalate, source="metadata")
    # binary, or a format this version cannot read (kept as declared: calls for the policy fail closed)
    return AnswerFormat(kind, (), escalate_label=escalate, source="metadata")


def confidence_value(value: Any) -> float | None:
    """A self-reported confidence as 0-1: a number (``85`` and ``"85%"`` read as percent) or a word."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, str):
        word = " ".join(value.strip().lower().replace("_", " ").split())
        if word in CONFIDENCE_WORDS:
            return CONFIDENCE_WORDS[word]
        value = word.rstrip("%")
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None  # a self-report; a missing one only means "unsure" to the router
    if 1 < number <= 100:
        number /= 100
    return number if 0 <= number <= 1 else None
