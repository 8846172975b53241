"""A policy's versions on disk: the base text and its candidates, side by side in the policy's folder.

```
policies/<id>/
├── policy.md            the base version: what enforces until a promotion says otherwise
├── metadata.toml        shared by every version (severity, flags, efforts, answer format, [lifecycle] bar)
├── golden.jsonl         the test suite every version is measured against
└── candidates/
    └── <name>.md        a candidate version (or .txt): its version is the content hash of its text
```

Why this shape: a version IS the content hash of its text (:func:`pipeline.policies.model.content_hash`), so a
candidate needs no number, only a file; an author names it for what it changes (``stricter-slurs.md``) and every
report, verdict and audit entry names the hash. Editing a candidate file makes another version (the old one's
reports no longer apply to it). Which version *enforces* is not a file: it is the registry's pointer
(:mod:`pipeline.lifecycle.registry`), which every worker follows without a restart; the base is what enforces
where no promotion was ever made (a fresh deployment).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ReasonerSettings
from pipeline.errors import PolicyError
from pipeline.policies.model import POLICY_FILES, Policy, content_hash, load_policy, policy_file

CANDIDATES_DIR = "candidates"
CANDIDATE_SUFFIXES = (".md", ".txt")
MIN_PREFIX = 4  # a version may be named by a unique prefix of its hash this long or longer
_HEX = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class VersionFile:
    """One version of a policy as a file in its folder."""

    version: str
    path: Path
    base: bool  # policy.md / policy.txt, not a candidate
    text: str

    @property
    def name(self) -> str:
        """How listings name it: ``base`` or the candidate file's stem."""
        return "base" if self.base else self.path.stem


def candidate_files(folder: Path) -> list[Path]:
    """The candidate texts under ``<folder>/candidates/``, by name."""
    root = Path(folder) / CANDIDATES_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_file() and p.suffix in CANDIDATE_SUFFIXES
                  and not p.name.startswith("."))


def version_files(folder: Path) -> list[VersionFile]:
    """The base version first, then every candidate (a candidate identical to an earlier file is left out)."""
    folder = Path(folder)
    out: list[VersionFile] = []
    seen: set[str] = set()
    for path, base in [(policy_file(folder), True), *((p, False) for p in candidate_files(folder))]:
        try:
            text = path.read_text(encoding="utf-8-sig")  # as load_policy reads it: a byte-order mark is not text
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{path} is not UTF-8 text ({exc})") from exc
        version = content_hash(text)
        if version in seen:
            continue
        seen.add(version)
        out.append(VersionFile(version, path, base, text))
    return out


def find_version(folder: Path, spec: str) -> VersionFile | None:
    """The version ``spec`` names among the folder's files: its full hash, a unique prefix of at least
    :data:`MIN_PREFIX` characters, ``base``, or a candidate's file name or stem. PolicyError when ambiguous."""
    files = version_files(folder)
    spec = spec.strip()
    if spec == "base":
        return files[0]
    exact = [f for f in files if f.version == spec or (not f.base and spec in (f.path.name, f.path.stem))]
    if exact:
        return exact[0]
    if len(spec) >= MIN_PREFIX and _HEX.match(spec):
        matches = [f for f in files if f.version.startswith(spec)]
        if len(matches) > 1:
            raise PolicyError(f"version prefix {spec!r} matches {', '.join(f.version for f in matches)}: give more")
        if matches:
            return matches[0]
    return None


def load_version(folder: Path, text: str, file_name: str, reasoner: ReasonerSettings | None = None) -> Policy:
    """The policy of ``folder`` at the version ``text``: the folder's metadata and golden set with that text."""
    reasoner = reasoner or ReasonerSettings()
    return load_policy(Path(folder), text=text, file_name=file_name, default_first=reasoner.first_effort,
                       default_escalated=reasoner.escalated_effort)


def add_candidate(folder: Path, source: Path, name: str | None = None, *, force: bool = False) -> VersionFile:
    """Copy ``source`` (byte for byte) into ``<folder>/candidates/`` as ``<name>.md|.txt``; returns the version.

    The name defaults to the source's stem; the suffix follows the source (``.md``, else ``.txt``). An existing
    file of that name is kept unless ``force``.
    """
    folder, source = Path(folder), Path(source)
    if not source.is_file():
        raise PolicyError(f"{source} is not a file")
    text = source.read_text(encoding="utf-8-sig")
    suffix = ".md" if source.suffix == ".md" else ".txt"
    stem = name or source.stem
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", stem) or stem == "base" or stem in POLICY_FILES:
        raise PolicyError(f"candidate name {stem!r}: letters, digits, '.', '_' and '-' only (not 'base')")
    target = folder / CANDIDATES_DIR / f"{stem}{suffix}"
    if target.exists() and not force and target.read_text(encoding="utf-8") != text:
        raise PolicyError(f"{target} exists with another text; pick another name or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return VersionFile(content_hash(text), target, False, text)
