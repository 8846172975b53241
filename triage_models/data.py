"""Loaders for the labelled data the triage classifier is trained and evaluated on.

Why a module of its own: the label conventions of each source are where training goes quietly wrong. In the
OpenAI moderation set a *missing* category key means "nobody labelled this", not "no". Loaders therefore keep
unknown labels explicit (``UNKNOWN = -1``) and the training code decides, per head, which rows it may use. A
later issue adds more sources behind the same :class:`LabelledSet` shape.

Sources: the OpenAI moderation set (training + 5-fold CV), reviewer feedback exported by the review service
(training), XSTest and HateCheck (evaluation only: false-positive traps; they carry only a binary label, kept in
``any_override`` with every category unknown).

The public sets are not part of the project: they are read in place from the datasets folder
(``Settings.datasets_dir``, ``MODPIPE_DATASETS_DIR``), which every loader takes as its argument. Provenance in a
model card names each file relative to that folder, never a machine's path.

Feedback format (``--feedback FILE``): JSON lines, one reviewer decision each::

    {"text": str, "label": 0|1, "categories": {"H": 0|1, ...},   # categories optional; missing = unknown
     "policy_id": str, "rule_id": str,                           # optional, kept for the record only
     "source": "review", "decided_at": "2025-01-01T12:00:00+00:00"}

``label`` is the reviewer's verdict (1 violates). Categories a reviewer did not state stay unknown: an "allow"
does not say which categories were considered. When one text was decided several times, the latest
``decided_at`` wins.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.datasets import DatasetNotFoundError, dataset_file  # noqa: F401 - the loaders raise DatasetNotFoundError

logger = logging.getLogger(__name__)

#: Where each public set lies inside the datasets folder.
OPENAI_MODERATION_FILE = Path("openai_moderation") / "samples-1680.jsonl.gz"
XSTEST_FILE = Path("xstest") / "xstest_prompts.csv"
HATECHECK_FILE = Path("hatecheck") / "test_suite_cases.csv"

#: Category codes of the OpenAI moderation taxonomy, in the order the artefact stores them.
CATEGORIES: tuple[str, ...] = ("S", "H", "V", "HR", "SH", "S3", "H2", "V2")
UNKNOWN = -1
#: ``any_override`` value for a row whose "violates anything" label the source does not give (never an ``any`` row,
#: even when one of its category labels is a known 0).
ANY_DROP = -2

AnyLabelRule = Literal["known_zero", "complete"]


@dataclass(frozen=True)
class LabelledSet:
    """Texts with per-category labels: 1 violates, 0 does not, ``UNKNOWN`` (-1) was not labelled."""

    name: str
    texts: list[str]
    labels: dict[str, np.ndarray]  # category -> int8 array (n,), values in {-1, 0, 1}
    sha256: str  # of the source file(s) exactly as read
    #: per-row binary "violates anything" label that overrides the one derived from categories (-1: derive)
    any_override: np.ndarray | None = None
    #: provenance per source merged into this set: name, file, sha256, rows
    sources: tuple[dict, ...] = ()

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
        if self.any_override is not None:
            known = (self.any_override == 0) | (self.any_override == 1)
            positive = np.where(known, self.any_override == 1, positive)
            defined = (defined | known) & (self.any_override != ANY_DROP)
        rows = np.flatnonzero(defined)
        return positive[rows].astype(np.int8), rows

    def merged(self, other: LabelledSet) -> LabelledSet:
        """This set followed by ``other`` (categories of either that the other lacks become unknown)."""
        cats = list(dict.fromkeys([*self.labels, *other.labels]))

        def column(ls: LabelledSet, c: str) -> np.ndarray:
            return ls.labels.get(c, np.full(len(ls), UNKNOWN, dtype=np.int8))

        def override(ls: LabelledSet) -> np.ndarray:
            return ls.any_override if ls.any_override is not None else np.full(len(ls), UNKNOWN, dtype=np.int8)

        digest = hashlib.sha256((self.sha256 + other.sha256).encode()).hexdigest()
        return LabelledSet(
            name=f"{self.name}+{other.name}", texts=[*self.texts, *other.texts],
            labels={c: np.concatenate([column(self, c), column(other, c)]) for c in cats}, sha256=digest,
            any_override=np.concatenate([override(self), override(other)]),
            sources=(*self.sources, *other.sources),
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_openai_moderation(datasets_dir: Path) -> LabelledSet:
    """The OpenAI moderation evaluation set (1,680 rows, MIT; github openai/moderation-api-release, data/)."""
    path = dataset_file(datasets_dir, OPENAI_MODERATION_FILE)
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
    sha = file_sha256(path)
    return LabelledSet(name="openai_moderation", texts=texts, labels=labels, sha256=sha,
                       sources=({"name": "openai_moderation", "file": OPENAI_MODERATION_FILE.as_posix(), "sha256": sha,
                                 "rows": len(texts), "license": "MIT"},))


def _binary_set(name: str, path: Path, relative: Path, texts: list[str], y: list[int], license_: str) -> LabelledSet:
    sha = file_sha256(path)
    unknown = {c: np.full(len(texts), UNKNOWN, dtype=np.int8) for c in CATEGORIES}
    return LabelledSet(name=name, texts=texts, labels=unknown, sha256=sha, any_override=np.asarray(y, dtype=np.int8),
                       sources=({"name": name, "file": relative.as_posix(), "sha256": sha, "rows": len(texts),
                                 "license": license_},))


def load_xstest(datasets_dir: Path) -> LabelledSet:
    """XSTest (450 prompts, CC-BY-4.0): 250 safe prompts that only look unsafe (homonyms such as "kill"), 200 unsafe."""
    path = dataset_file(datasets_dir, XSTEST_FILE)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return _binary_set("xstest", path, XSTEST_FILE, [r["prompt"] for r in rows],
                       [int(r["label"] == "unsafe") for r in rows], "CC-BY-4.0")


def load_hatecheck(datasets_dir: Path) -> LabelledSet:
    """HateCheck functional tests (3,728 cases, CC-BY-4.0): hateful vs non-hateful, incl. counter-speech."""
    path = dataset_file(datasets_dir, HATECHECK_FILE)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return _binary_set("hatecheck", path, HATECHECK_FILE, [r["test_case"] for r in rows],
                       [int(r["label_gold"] == "hateful") for r in rows], "CC-BY-4.0")


def load_feedback(path: Path) -> LabelledSet:
    """Reviewer decisions exported by the review service (format in the module docstring)."""
    latest: dict[str, tuple[str, dict]] = {}
    with Path(path).open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not JSON: {exc.msg}") from exc
            text, label = row.get("text") if isinstance(row, dict) else None, row.get("label")
            if not isinstance(text, str) or label not in (0, 1) or isinstance(label, bool):
                raise ValueError(f"{path}:{line_no}: needs a string 'text' and a 'label' of 0 or 1")
            categories = row.get("categories") or {}
            if not isinstance(categories, dict) or any(
                c not in CATEGORIES or v not in (0, 1) or isinstance(v, bool) for c, v in categories.items()
            ):
                raise ValueError(f"{path}:{line_no}: 'categories' must map {CATEGORIES} codes to 0 or 1")
            decided_at = str(row.get("decided_at") or "")
            if text not in latest or decided_at >= latest[text][0]:
                latest[text] = (decided_at, row)
    texts = list(latest)
    labels = {c: np.asarray([(latest[t][1].get("categories") or {}).get(c, UNKNOWN) for t in texts], dtype=np.int8)
              for c in CATEGORIES}
    y = np.asarray([latest[t][1]["label"] for t in texts], dtype=np.int8)
    sha = file_sha256(Path(path))
    logger.info("loaded %d distinct reviewed texts from %s", len(texts), path)
    return LabelledSet(name="feedback", texts=texts, labels=labels, sha256=sha, any_override=y,
                       # the file's name only: a model card never carries a machine's path (sha256 identifies it)
                       sources=({"name": "feedback", "file": Path(path).name, "sha256": sha, "rows": len(texts),
                                 "license": "project-internal reviewer decisions"},))


DATASETS = {"openai_moderation": load_openai_moderation, "xstest": load_xstest, "hatecheck": load_hatecheck}


def dataset_names() -> list[str]:
    """Every data set :func:`load_dataset` knows by name (the extra sources live in :mod:`triage_models.sources`)."""
    from triage_models import mix, sources

    return [*DATASETS, *sources.TRAINING_SOURCES, *sources.EVALUATION_SETS, *mix.MIXES]


def load_dataset(name_or_file: str, datasets_dir: Path) -> LabelledSet:
    """A public data set by name (read from ``datasets_dir``), or a JSON-lines file in the feedback format."""
    from triage_models import mix, sources

    if name_or_file in DATASETS:
        return DATASETS[name_or_file](datasets_dir)
    named = {**sources.TRAINING_SOURCES, **sources.EVALUATION_SETS, **mix.MIXES}
    if name_or_file in named:
        return named[name_or_file](datasets_dir)
    path = Path(name_or_file)
    if not path.is_file():
        raise FileNotFoundError(f"{name_or_file} is neither a data set name ({', '.join(dataset_names())}) nor a file")
    return load_feedback(path)
