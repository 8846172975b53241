"""Policy lint: every way a policy departs from the gpt-oss-safeguard guide's advice, as sentences.

Lint reads only the policy folder: golden references are checked by count, label and rule id, never resolved, so
workers (which load policies strictly, through lint) start without the shared datasets folder.
"""

from __future__ import annotations

import re
from collections import Counter

from pipeline.policies.model import (
    HEDGE_WORDS,
    MAX_EXAMPLES,
    MAX_TOKENS,
    MIN_EXAMPLES,
    MIN_GOLDEN,
    MIN_TOKENS,
    OUTPUT_KEYS,
    REQUIRED_SECTIONS,
    Policy,
    count_tokens,
    split_sections,
)


def lint_policy(policy: Policy) -> list[str]:
    """Every problem with a policy, as sentences (empty list: clean)."""
    problems: list[str] = []
    text = policy.text
    if not re.match(r"^# \S", text):
        problems.append("policy.md must start with '# Policy Name'")
    sections = split_sections(text)
    for name in REQUIRED_SECTIONS:
        if name not in sections:
            problems.append(f"missing section '## {name}'")
    instructions = sections.get("INSTRUCTIONS", "")
    missing = [key for key in OUTPUT_KEYS if f'"{key}"' not in instructions]
    if missing:
        problems.append(f"INSTRUCTIONS must state the output format; missing keys: {', '.join(missing)}")
    examples_body = sections.get("EXAMPLES", "")
    before_examples = examples_body.split("Content:", 1)[0]
    if any(f'"{key}"' not in before_examples for key in OUTPUT_KEYS):
        problems.append("EXAMPLES must restate the full output format before the first example")
    if "wins" not in instructions:
        problems.append("INSTRUCTIONS must say which rule wins when two apply")
    if not re.search(r"confidence below|escalat", instructions, re.IGNORECASE):
        problems.append("INSTRUCTIONS must give an escalation path for ambiguity (e.g. 'confidence below 0.5')")
    ids = [r.rule_id for r in policy.rules]
    prefixes = sorted({re.match(r"[A-Z]+", i).group(0) for i in ids})  # type: ignore[union-attr]
    if len(prefixes) > 1:
        problems.append(f"rule ids mix prefixes {', '.join(prefixes)}; one policy, one prefix")
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        problems.append(f"rule ids not unique: {', '.join(duplicates)}")
    for rule in policy.rules:
        tier = re.match(r"[A-Z]+(\d+)\.", rule.rule_id)
        if tier and (int(tier.group(1)) == 0) != (rule.label == 0):
            problems.append(f"rule {rule.rule_id}: tier 0 ids belong in SAFE (0), others in VIOLATES (1)")
    if not any(r.label == 1 for r in policy.rules) or not any(r.label == 0 for r in policy.rules):
        problems.append("policy needs both VIOLATES and SAFE rules")
    known = policy.rule_ids
    if not MIN_EXAMPLES <= len(policy.examples) <= MAX_EXAMPLES:
        problems.append(f"{len(policy.examples)} examples; the guide asks for {MIN_EXAMPLES}-{MAX_EXAMPLES}")
    if {e.label for e in policy.examples} != {0, 1}:
        problems.append("examples must show both labels")
    for ex in policy.examples:
        unknown = [r for r in ex.rule_ids if r not in known]
        if unknown or not ex.rule_ids:
            problems.append(f"example {ex.text[:40]!r} cites unknown or no rule ids: {unknown}")
        elif any(policy.rule(r).label != ex.label for r in ex.rule_ids):  # type: ignore[union-attr]
            problems.append(f"example {ex.text[:40]!r}: label {ex.label} disagrees with its rules")
    for word in HEDGE_WORDS:
        if re.search(rf"\b{word}\b", text, re.IGNORECASE):
            problems.append(f"uses the vague word {word!r}")
    tokens = count_tokens(text)
    if not MIN_TOKENS <= tokens <= MAX_TOKENS:
        problems.append(f"about {tokens} tokens; keep it within {MIN_TOKENS}-{MAX_TOKENS}")
    if "<|" in text:
        problems.append("policy text contains '<|' (harmony control tokens)")
    if len(policy.golden) < MIN_GOLDEN:
        problems.append(f"golden set has {len(policy.golden)} rows; needs at least {MIN_GOLDEN}")
    elif {g.label for g in policy.golden} != {0, 1}:
        problems.append("golden set must contain both labels")
    for g in policy.golden:
        rule = policy.rule(g.rule_id)
        if rule is None:
            problems.append(f"golden row {g.name} cites unknown rule {g.rule_id}")
        elif rule.label != g.label:
            problems.append(f"golden row {g.name}: label {g.label} disagrees with rule {g.rule_id}")
    counts = Counter(g.ref or g.text for g in policy.golden)
    repeated = sorted({g.name for g in policy.golden if counts[g.ref or g.text] > 1})
    if repeated:
        problems.append(f"golden rows repeated: {', '.join(repeated)}")
    return problems
