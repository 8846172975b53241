"""Policies as data: what gpt-oss-safeguard reads at inference time, loaded, linted and versioned.

* :mod:`~pipeline.policies.model`: one ``policies/<id>/`` folder as a :class:`Policy` (its version is the content
  hash of its text), its rules, examples and golden set, in any of the guide's formats;
* :mod:`~pipeline.policies.formats`: the answer format a policy asks for (JSON, a label word, 0/1);
* :mod:`~pipeline.policies.lint`: errors (what breaks the prompt) and warnings (the guide's advice);
* :mod:`~pipeline.policies.importer`: a policy written elsewhere made into a folder (``modpipe policy import``);
* :mod:`~pipeline.policies.library`: every policy under one folder;
* :mod:`~pipeline.policies.versions`: a policy's base and candidate versions side by side in its folder;
* :mod:`~pipeline.policies.golden`: a policy's golden set run against a reasoner endpoint (``modpipe policy test``).
"""

from pipeline.policies.formats import AnswerFormat, detect_format
from pipeline.policies.library import PolicyLibrary
from pipeline.policies.lint import Finding, lint_policy
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
    "AnswerFormat",
    "Finding",
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
    "detect_format",
    "lint_policy",
    "load_policy",
    "o200k_encoding",
    "reference_text",
    "resolve_golden",
]
