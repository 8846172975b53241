"""docs/BENCHMARKS.md: each ``modpipe bench`` command owns one marked section and rewrites only that one."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import PROJECT_ROOT

BENCHMARKS_MD = PROJECT_ROOT / "docs" / "BENCHMARKS.md"
_HEADER = "# Benchmarks\n\nNumbers written by `modpipe bench ...` commands; do not edit the marked sections by hand.\n"


def markers(name: str) -> tuple[str, str]:
    """The begin/end comment lines that delimit section ``name``."""
    return f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"


def replace_section(name: str, section: str, path: Path = BENCHMARKS_MD) -> None:
    """Put ``section`` (which starts and ends with its markers) in place of the old one, or append it."""
    begin, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
