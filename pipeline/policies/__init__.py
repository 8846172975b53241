"""Policies as data: what gpt-oss-safeguard reads at inference time, loaded, linted and versioned.

* :mod:`~pipeline.policies.model`: one ``policies/<id>/`` folder as a :class:`Policy` (its version is the content
  hash of its text), its rules, examples and golden set;
* :mod:`~pipeline.policies.lint`: every departure from the gpt-oss-safeguard guide's advice;
* :mod:`~pipeline.policies.library`: every policy under one folder;
* :mod:`~pipeline.policies.golden`: a policy's golden set run against a reasoner endpoint (``modpipe policy test``).
"""

from pipeline.policies.library import PolicyLibrary
from pipeline.policies.lint import lint_policy
from pipeline.policies.model import (
    MIN_GOLDEN,
    SEVERITIES,
    Example,
    GoldenExample,
    GoldenReferenceError,
    Policy,
    Rule,
    content_hash,
    count_tokens,
    load_policy,
    o200k_encoding,
    reference_text,
    resolve_golden,
)

__all__ = [
    "MIN_GOLDEN",
    "SEVERITIES",
    "Example",
    "GoldenExample",
    "GoldenReferenceError",
    "Policy",
    "PolicyLibrary",
    "Rule",
    "content_hash",
    "count_tokens",
    "lint_policy",
    "load_policy",
    "o200k_encoding",
    "reference_text",
    "resolve_golden",
]
