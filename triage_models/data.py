"""Loaders for the labelled data the triage classifier is trained and evaluated on.

Why a module of its own: the label conventions of each source are where training goes quietly wrong. In the
OpenAI moderation set a *missing* category key means "nobody labelled this", not "no". Loaders therefore keep
unknown labels explicit (``UNKNOWN = -1``) and the training code decides, per head, which rows it may use. A
later issue adds more sources (Davidson, HateCheck, XSTest) behind the same :class:`LabelledSet` shape.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent / "data"
OPENAI_MODERATION_FILE = DATA_DIR / "openai_moderation" / "samples-1680.jsonl.gz"

#: Category codes of the OpenAI moderation taxonomy, in the order the artefact stores them.
CATEGORIES: tuple[str, ...] = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")
UNKNOWN = -1

AnyLabelRule = Literal["known_zero", "complete"]


@dataclass(frozen=True)
class LabelledSet:
    """Texts with per-category labels: 1 violates, 0 does not, ``UNKNOWN`` (-1) was not labelled."""

    name: str
    texts: list[str]
    labels: dict[str, np.ndarray]  # category -> int8 array (n,), values in {-1, 0, 1}
    sha256: str  # of the source file(s) exactly as read

    def __post_init__(self) -> None:
        for category, column in self.labels.items():
            if column.shape != (len(self.texts),):
                raise ValueError(f"label column {category} has shape {column.shape}, expected ({len(self.texts)},)")

    def __len__(self) -> int:
        return len(self.texts)

    def category_rows(self, category: str) -> np.ndarray:
        """Indices of rows whose ``category`` label is known."""
        return np.flatnonzero(self.labels[category] != UNKNOWN)

    def any_labels(self, rule: AnyLabelRule = "known_zero") -> tuple[np.ndarray, np.ndarray]:
        """Binary "violates any category" label and the rows it is defined for: ``(y, rows)``.

        A row with any key equal to 1 is a violation. For the others:

        * ``known_zero`` (default): a negative if at least one key is known and none is 1. Unknown keys are taken
          as "no". This is how the source's own binary benchmarks (and gpt-oss-safeguard's reported F1) read the
          set; its risk is a few hidden positives among negatives, mostly in rows labelled only for V/HR/SH/V2,
          which are overwhelmingly benign web text.
        * ``complete``: a negative only if all keys are known and 0; rows with unknown keys and no 1 are dropped.

        Rows with no known key at all are dropped under both rules (none exist in the OpenAI set).
        """
        matrix = np.stack([self.labels[c] for c in self.labels], axis=1)
        positive = (matrix == 1).any(axis=1)
        if rule == "known_zero":
            defined = positive | (matrix != UNKNOWN).any(axis=1)
        elif rule == "complete":
            defined = positive | (matrix != UNKNOWN).all(axis=1)
        else:
            raise ValueError(f"unknown any-label rule {rule!r}")
        rows = np.flatnonzero(defined)
        return positive[rows].astype(np.int8), rows


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_openai_moderation(path: Path = OPENAI_MODERATION_FILE) -> LabelledSet:
    """The OpenAI moderation evaluation set (1,680 rows, MIT; see ``data/PROVENANCE.md``)."""
    if not path.is_file():
        raise FileNotFoundError(f"OpenAI moderation data not found at {path}")
    texts: list[str] = []
    columns: dict[str, list[int]] = {c: [] for c in CATEGORIES}
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            text = row.get("prompt")
            if not isinstance(text, str):
                raise ValueError(f"{path}:{line_no}: row has no string 'prompt'")
            texts.append(text)
            for category in CATEGORIES:
                value = row.get(category, UNKNOWN)
                if value not in (0, 1, UNKNOWN):
                    raise ValueError(f"{path}:{line_no}: label {category}={value!r} is not 0/1")
                columns[category].append(int(value))
    labels = {c: np.asarray(v, dtype=np.int8) for c, v in columns.items()}
    logger.info("loaded %d rows from %s", len(texts), path)
    return LabelledSet(name="openai_moderation", texts=texts, labels=labels, sha256=file_sha256(path))
