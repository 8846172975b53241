"""Policy lint: every way a policy departs from the gpt-oss-safeguard guide's advice, as findings.

Two levels, because a policy written in the guide's formats must work unchanged:

* **errors** break the prompt: an empty text, or harmony control tokens (``<|``) that would restructure it. Strict
  loading (workers) refuses these; nothing else.
* **warnings** are the guide's advice (sections, the output format stated and restated, an escalation path, one
  rule-id prefix, 4-6 boundary examples, 400-600 tokens, a golden set of 40+) and what the reasoner cannot use
  fully (an unsupported answer format, example answers it cannot read, no rule ids to cite, no metadata). They are
  logged at load and shown by ``modpipe policy lint``; ``--strict`` makes them fail too (the shipped policies
  are held to that).

Lint reads only the policy folder: golden references are checked by count, label and rule id, never resolved, so
workers (which load policies through lint) start without the shared datasets folder.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from pipeline.policies.model import (
    HEDGE_WORDS,
    MAX_EXAMPLES,
    MAX_TOKENS,
    MIN_EXAMPLES,
    MIN_GOLDEN,
    MIN_TOKENS,
    REQUIRED_SECTIONS,
    Policy,
    count_tokens,
    rule_tier,
    split_sections,
)

ERROR, WARNING = "error", "warning"


@dataclass(frozen=True)
class Finding:
    level: str  # "error" (breaks the prompt: strict loading refuses it) or "warning" (the guide's advice)
    message: str

    def __str__(self) -> str:
        return self.message


def errors(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.level == ERROR]


def lint_policy(policy: Policy) -> list[Finding]:
    """Every finding for a policy, errors first (empty list: clean)."""
    found: list[Finding] = []

    def error(message: str) -> None:
        found.append(Finding(ERROR, message))

    def warn(message: str) -> None:
        found.append(Finding(WARNING, message))

    text = policy.text
    if not text.strip():
        error(f"{policy.policy_file} is empty")
    if "<|" in text:
        error(f"{policy.policy_file} contains '<|' (harmony control tokens would restructure the prompt)")
    if policy.metadata_missing:
        warn("no metadata.toml: id from the folder, name from the title, severity medium, effort low/high")
    fmt = policy.answer_format
    if not fmt.supported:
        warn(f"answer format {fmt.kind!r} is not one the reasoner reads (json, label, binary): every call for this "
             "policy fails closed to review")
    elif fmt.source == "default":
        warn("the text states no answer format (a JSON object with \"violation\", outcome words like VALID/INVALID, "
             "or 0/1); the reasoner expects the project's JSON")
    if not re.match(r"^# \S", text):
        warn(f"{policy.policy_file} does not start with '# Policy Name'")
    sections = split_sections(text)
    for name in REQUIRED_SECTIONS:
        if name not in sections:
            warn(f"missing section '## {name}'")
    instructions = sections.get("INSTRUCTIONS", text)
    if fmt.kind == "json":
        missing = [key for key in fmt.keys if f'"{key}"' not in instructions]
        if missing:
            warn(f"INSTRUCTIONS must state the output format; missing keys: {', '.join(missing)}")
        examples_body = sections.get("EXAMPLES", "")
        before_examples = examples_body.split("Content:", 1)[0]
        if examples_body and any(f'"{key}"' not in before_examples for key in fmt.keys):
            warn("EXAMPLES must restate the full output format before the first example")
    elif fmt.kind == "label":
        for word in (fmt.violation_label, fmt.safe_label):
            if not re.search(rf"\b{re.escape(word)}\b", text):
                warn(f"the text never names the answer word {word!r}")
    if "wins" not in instructions:
        warn("INSTRUCTIONS must say which rule wins when two apply")
    if not re.search(r"confidence below|escalat", instructions, re.IGNORECASE):
        warn("INSTRUCTIONS must give an escalation path for ambiguity (e.g. 'confidence below 0.5')")
    ids = [r.rule_id for r in policy.rules]
    if not ids:
        warn("defines no rule ids (e.g. '- **XX1.a** text' or 'XX1.a text'): answers cannot cite rules")
    prefixes = sorted({re.match(r"[A-Z]+", i).group(0) for i in ids})  # type: ignore[union-attr]
    if len(prefixes) > 1:
        warn(f"rule ids mix prefixes {', '.join(prefixes)}; one policy, one prefix")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        warn(f"rule ids not unique: {', '.join(duplicates)}")
    for rule in policy.rules:
        tier = rule_tier(rule.rule_id)
        if rule.label_from != "tier" and tier is not None and (tier == 0) != (rule.label == 0):
            warn(f"rule {rule.rule_id}: tier 0 ids belong in SAFE (0), others in VIOLATES (1)")
    if ids and (not any(r.label == 1 for r in policy.rules) or not any(r.label == 0 for r in policy.rules)):
        warn("policy needs both VIOLATES and SAFE rules")
    known = policy.rule_ids
    if not MIN_EXAMPLES <= len(policy.examples) <= MAX_EXAMPLES:
        warn(f"{len(policy.examples)} examples; the guide asks for {MIN_EXAMPLES}-{MAX_EXAMPLES}")
    if policy.examples and {e.label for e in policy.examples} != {0, 1}:
        warn("examples must show both labels")
    for problem in policy.unreadable_examples:
        warn(problem)
    for ex in policy.examples:
        unknown = [r for r in ex.rule_ids if r not in known]
        if unknown or (not ex.rule_ids and fmt.asks_rules):
            warn(f"example {ex.text[:40]!r} cites unknown or no rule ids: {unknown}")
        elif any(policy.rule(r).label != ex.label for r in ex.rule_ids):  # type: ignore[union-attr]
            warn(f"example {ex.text[:40]!r}: label {ex.label} disagrees with its rules")
    for word in HEDGE_WORDS:
        if re.search(rf"\b{word}\b", text, re.IGNORECASE):
            warn(f"uses the vague word {word!r}")
    tokens = count_tokens(text)
    if not MIN_TOKENS <= tokens <= MAX_TOKENS:
        warn(f"about {tokens} tokens; keep it within {MIN_TOKENS}-{MAX_TOKENS}")
    if len(policy.golden) < MIN_GOLDEN:
        warn(f"golden set has {len(policy.golden)} rows; needs at least {MIN_GOLDEN}")
    elif {g.label for g in policy.golden} != {0, 1}:
        warn("golden set must contain both labels")
    for g in policy.golden:
        if not g.rule_id:
            continue
        rule = policy.rule(g.rule_id)
        if rule is None:
            warn(f"golden row {g.name} cites unknown rule {g.rule_id}")
        elif rule.label != g.label:
            warn(f"golden row {g.name}: label {g.label} disagrees with rule {g.rule_id}")
    counts = Counter(g.ref or g.text for g in policy.golden)
    repeated = sorted({g.name for g in policy.golden if counts[g.ref or g.text] > 1})
    if repeated:
        warn(f"golden rows repeated: {', '.join(repeated)}")
    return sorted(found, key=lambda f: f.level != ERROR)
