"""``modpipe policy import``: a policy written elsewhere (the guide's sample format, a community pack) made into a
policy folder, unchanged.

* The text is copied byte for byte (``policy.md`` for Markdown sources, else ``policy.txt``), so the version (the
  content hash) is the source's own and the model reads exactly what the author wrote.
* ``metadata.toml`` gets defaults (name from the title, severity medium, ``scope = "on_request"`` so an imported
  policy judges nothing until items name it or an operator makes it a default) and the answer format detected
  from the text, written out as an ``[answer]`` table to review.
* Golden sets are converted from CSV files: the columns are named (``--text-column``, ``--label-column``,
  optionally ``--rule-column``; by header name, or by 0-based position for a file without a header). A label is
  read as a violation / safe word (``1``/``0``, ``INVALID``/``VALID``, ``unsafe``/``safe``, ... or the words given),
  as one of the policy's rule ids (its label and the rule), or as a tier of them (``SP2``: the tier's label, no
  rule). Rows without text or with a label that reads as neither are skipped and counted; duplicates are dropped.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PolicyError
from pipeline.policies.formats import AnswerFormat, detect_format
from pipeline.policies.lint import Finding, lint_policy
from pipeline.policies.model import (
    POLICY_FILES,
    SCOPES,
    SEVERITIES,
    Policy,
    load_policy,
    parse_rules,
    policy_title,
    rule_tier,
)

POLICY_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
VIOLATION_WORDS = frozenset({"1", "true", "yes", "violation", "violating", "violates", "invalid", "unsafe", "block",
                             "remove", "flagged", "positive"})
SAFE_WORDS = frozenset({"0", "false", "no", "safe", "valid", "allow", "ok", "none", "not violating", "negative",
                        "non-violating", "benign"})
TEXT_COLUMNS = ("text", "content", "example", "prompt", "message", "post")
LABEL_COLUMNS = ("label", "violation", "classification", "gold", "expected", "answer")


@dataclass(frozen=True)
class GoldenSource:
    """One CSV file and how to read it."""

    path: Path
    text_column: str | None = None  # header name or 0-based index; None: the first of TEXT_COLUMNS in the header
    label_column: str | None = None  # likewise, LABEL_COLUMNS
    rule_column: str | None = None
    violation_values: tuple[str, ...] = ()
    safe_values: tuple[str, ...] = ()


@dataclass
class ImportReport:
    folder: Path
    policy: Policy
    answer_format: AnswerFormat
    golden_rows: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # why -> rows
    examples_skipped: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)


def policy_source(src: Path) -> Path:
    """The policy text in ``src`` (a file, or a folder holding policy.md / policy.txt or a single .md / .txt)."""
    if src.is_file():
        return src
    if not src.is_dir():
        raise PolicyError(f"{src} does not exist")
    for name in POLICY_FILES:
        if (src / name).is_file():
            return src / name
    candidates = sorted(p for p in src.iterdir() if p.suffix.lower() in (".md", ".txt") and p.is_file()
                        and p.stem.lower() not in ("readme", "license", "changelog"))
    if len(candidates) != 1:
        raise PolicyError(f"{src}: expected one policy text (.md or .txt), found "
                          f"{', '.join(p.name for p in candidates) or 'none'}; pass the file itself")
    return candidates[0]


def _column(header: list[str] | None, wanted: str | None, defaults: tuple[str, ...], what: str) -> int:
    if wanted is not None and wanted.isdigit():
        return int(wanted)
    if header is None:
        raise PolicyError(f"the {what} column must be given as a 0-based position for a file without a header")
    lowered = [h.strip().lower() for h in header]
    names = (wanted,) if wanted is not None else defaults
    for name in names:
        if name.strip().lower() in lowered:
            return lowered.index(name.strip().lower())
    raise PolicyError(f"no {what} column {'named ' + repr(wanted) if wanted else 'among ' + ', '.join(defaults)} "
                      f"in the header ({', '.join(header)}); name it with --{what}-column")


def _label(value: str, rules: dict[str, int], tiers: dict[str, int], source: GoldenSource,
           fmt: AnswerFormat) -> tuple[int, str] | None:
    """(label, rule id) a cell means, or None."""
    cell = value.strip()
    if not cell:
        return None
    if cell in rules:
        return rules[cell], cell
    if cell.upper() in tiers:
        return tiers[cell.upper()], ""
    word = cell.lower()
    violation = {v.lower() for v in source.violation_values} or (VIOLATION_WORDS | {fmt.violation_label.lower()})
    safe = {v.lower() for v in source.safe_values} or (SAFE_WORDS | {fmt.safe_label.lower()})
    if word in violation and word not in safe:
        return 1, ""
    if word in safe:
        return 0, ""
    return None


def convert_golden(source: GoldenSource, policy_text: str, fmt: AnswerFormat) -> tuple[list[dict], dict[str, int]]:
    """The CSV's rows as golden rows, and the skipped ones counted by reason."""
    rules = {r.rule_id: r.label for r in parse_rules(policy_text, fmt)}
    tiers: dict[str, int] = {}
    for rule_id, label in rules.items():
        prefix = re.match(r"[A-Z]+", rule_id).group(0)  # type: ignore[union-attr]
        tiers.setdefault(f"{prefix}{rule_tier(rule_id)}", label)
    positional = all(c is None or c.isdigit() for c in (source.text_column, source.label_column, source.rule_column)) \
        and source.text_column is not None and source.label_column is not None
    with source.path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.reader(handle))
    header = None if positional or not rows else rows[0]
    body = rows if header is None else rows[1:]
    text_at = _column(header, source.text_column, TEXT_COLUMNS, "text")
    label_at = _column(header, source.label_column, LABEL_COLUMNS, "label")
    rule_at = _column(header, source.rule_column, (), "rule") if source.rule_column is not None else None
    out: list[dict] = []
    skipped: dict[str, int] = {}
    seen: set[str] = set()
    for row in body:
        text = row[text_at].strip() if text_at < len(row) else ""
        if not text:
            skipped["no text"] = skipped.get("no text", 0) + 1
            continue
        meaning = _label(row[label_at] if label_at < len(row) else "", rules, tiers, source, fmt)
        if meaning is None:
            skipped["label not read"] = skipped.get("label not read", 0) + 1
            continue
        label, rule_id = meaning
        if rule_at is not None and rule_at < len(row) and row[rule_at].strip() in rules:
            rule_id = row[rule_at].strip()
        if text in seen:
            skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            continue
        seen.add(text)
        out.append({"text": text, "label": label, **({"rule_id": rule_id} if rule_id else {})})
    return out, skipped


def _metadata(policy_id: str, name: str, severity: str, scope: str, fmt: AnswerFormat, source: Path) -> str:
    def q(text: str) -> str:
        return json.dumps(text, ensure_ascii=False)

    return "\n".join([
        f"# Imported by `modpipe policy import` from {source.name}. The policy text is copied unchanged; its version",
        "# is the content hash of that text. Review these defaults before enforcing the policy.",
        f"id = {q(policy_id)}",
        f"name = {q(name)}",
        "# low | medium | high | critical: decides precedence when several policies are violated at once.",
        f"severity = {q(severity)}",
        "high_risk = false",
        "escalate_to_humans = false",
        "enforcing = true",
        "# on_request: judged only for items that name this policy; \"default\" judges every escalated item.",
        f"scope = {q(scope)}",
        "",
        "[effort]",
        'first = "low"',
        'escalated = "high"',
        "",
        f"# The answer format detected from the text ({'; '.join(fmt.notes) or fmt.describe()}).",
        fmt.to_toml(),
    ])


def import_policy(src: Path, policy_id: str, dest_root: Path, *, golden: list[GoldenSource] | None = None,
                  name: str | None = None, severity: str = "medium", scope: str = "on_request",
                  force: bool = False) -> ImportReport:
    """Write ``dest_root/policy_id/`` from ``src``; PolicyError naming the problem (nothing is left half-written)."""
    if not POLICY_ID.match(policy_id):
        raise PolicyError(f"policy id {policy_id!r}: use lower-case letters, digits, '_' and '-'")
    if severity not in SEVERITIES:
        raise PolicyError(f"severity {severity!r} not in {SEVERITIES}")
    if scope not in SCOPES:
        raise PolicyError(f"scope {scope!r} not in {SCOPES}")
    text_path = policy_source(Path(src))
    raw = text_path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # what load_policy will read: a byte-order mark is not policy text
    except UnicodeDecodeError as exc:
        raise PolicyError(f"{text_path} is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise PolicyError(f"{text_path} is empty")
    fmt = detect_format(text)
    rows: list[dict] = []
    skipped: dict[str, int] = {}
    for source in golden or []:
        converted, why = convert_golden(source, text, fmt)
        known = {r["text"] for r in rows}
        for row in converted:
            if row["text"] in known:
                skipped["duplicate"] = skipped.get("duplicate", 0) + 1
            else:
                rows.append(row)
        for reason, n in why.items():
            skipped[reason] = skipped.get(reason, 0) + n
    folder = Path(dest_root) / policy_id
    if folder.exists() and not force:
        raise PolicyError(f"{folder} exists; pass --force to replace it")
    staging = folder.with_name(f".{policy_id}.importing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        target = "policy.md" if text_path.suffix.lower() == ".md" else "policy.txt"
        (staging / target).write_bytes(raw)
        (staging / "metadata.toml").write_text(
            _metadata(policy_id, name or policy_title(text) or policy_id, severity, scope, fmt, text_path),
            encoding="utf-8")
        if rows:
            (staging / "golden.jsonl").write_text(
                "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        shutil.rmtree(folder, ignore_errors=True)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    policy = load_policy(folder)
    return ImportReport(folder, policy, policy.answer_format, len(rows), skipped,
                        list(policy.unreadable_examples), lint_policy(policy))
