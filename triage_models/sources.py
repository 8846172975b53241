"""More labelled sources for the triage classifier, each mapped onto the OpenAI taxonomy only where it is unambiguous.

Why a module of its own: every source labels a different thing ("offensive", "sexist", "abusive to a chatbot",
"toxic"), and the mapping onto the triage categories is where extra data quietly teaches the wrong lesson. Each
loader states its mapping; a label the source does not give stays unknown (``UNKNOWN``), and a row whose
"violates anything" label cannot be read from the source is marked ``ANY_DROP`` (never an ``any`` row).

Every source keeps its official split where it has one; sources without one (Davidson, Wikipedia talk) are split
by a hash of the text, so a row's split never depends on the machine or the order of rows. What trains and what
only evaluates is fixed here (:data:`ROLES`), not chosen per run: evaluation-only sets never reach training.

All files are read in place from the datasets folder (``Settings.datasets_dir``); see ``DATASETS.md`` there for
counts and licences. Model cards name each file relative to that folder, with its sha256.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from triage_models.data import (
    ANY_DROP,
    CATEGORIES,
    UNKNOWN,
    LabelledSet,
    dataset_file,
    file_sha256,
)

Split = str  # "train" | "test"


def hash_split(text: str, test_share: float = 0.2) -> Split:
    """A stable split for sources that have none: the first 4 bytes of sha256(text) against ``test_share``."""
    value = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:4], "big") / 2**32
    return "test" if value < test_share else "train"


def _build(name: str, files: list[tuple[Path, Path]], license_: str, rows: list[tuple[str, dict[str, int], int]],
           language: str = "en") -> LabelledSet:
    """``rows``: (text, known category labels, any label: 0/1, UNKNOWN to derive, ANY_DROP to exclude)."""
    texts = [r[0] for r in rows]
    labels = {c: np.asarray([r[1].get(c, UNKNOWN) for r in rows], dtype=np.int8) for c in CATEGORIES}
    override = np.asarray([r[2] for r in rows], dtype=np.int8)
    shas = [file_sha256(path) for path, _ in files]
    digest = hashlib.sha256("".join(shas).encode()).hexdigest() if len(shas) > 1 else shas[0]
    sources = ({"name": name, "file": " + ".join(rel.as_posix() for _, rel in files), "sha256": digest,
                "rows": len(rows), "license": license_, "language": language,
                **({"files": [{"file": rel.as_posix(), "sha256": sha} for (_, rel), sha in zip(files, shas, strict=True)]}
                   if len(files) > 1 else {})},)
    return LabelledSet(name=name, texts=texts, labels=labels, sha256=digest, any_override=override, sources=sources)


def _csv_rows(path: Path, encoding: str = "utf-8") -> list[dict[str, str]]:
    with path.open(newline="", encoding=encoding) as handle:
        return list(csv.DictReader(handle))


# --- English training sources -----------------------------------------------------------------------------------

DAVIDSON_FILE = Path("davidson_hate_offensive") / "labeled_data.csv"


def load_davidson(datasets_dir: Path, split: Split | None = "train") -> LabelledSet:
    """Davidson et al. 2017 tweets (MIT). ``class`` 0 hate speech -> H=1; 2 neither -> H=0, HR=0 and not a
    violation; 1 offensive (mostly profanity, which no policy here forbids) -> nothing known, dropped."""
    path = dataset_file(datasets_dir, DAVIDSON_FILE)
    rows = []
    for r in _csv_rows(path):
        text, cls = r["tweet"], r["class"]
        if split is not None and hash_split(text) != split:
            continue
        if cls == "0":
            rows.append((text, {"H": 1}, 1))
        elif cls == "2":
            rows.append((text, {"H": 0, "HR": 0}, 0))
    return _build(f"davidson:{split or 'all'}", [(path, DAVIDSON_FILE)], "MIT", rows)


CONVABUSE_FILES = {s: Path("convabuse") / f"ConvAbuseEMNLP{s}.csv" for s in ("train", "valid", "test")}


def _convabuse_votes(header: list[str], row: list[str]) -> tuple[int, int]:
    """(raters, abusive votes): an annotator's ``is_abuse.-1/-2/-3`` cell set means abusive. Read by position."""
    raters = abusive = 0
    for i, name in enumerate(header):
        if name.endswith("_is_abuse.1"):
            cells = row[i : i + 5]
            if any(c.strip() == "1" for c in cells):
                raters += 1
                abusive += int(any(c.strip() == "1" for c in cells[2:5]))
    return raters, abusive


def load_convabuse(datasets_dir: Path, split: Split | None = "train") -> LabelledSet:
    """ConvAbuse (CC-BY-4.0): user turns to two chatbots. Strict majority of raters abusive -> HR=1; no rater
    abusive -> HR=0 and not a violation; split votes are dropped. ``train`` is the official train + valid files."""
    parts = {"train": ("train", "valid"), "test": ("test",), None: ("train", "valid", "test")}[split]
    rows, files = [], []
    for part in parts:
        rel = CONVABUSE_FILES[part]
        path = dataset_file(datasets_dir, rel)
        files.append((path, rel))
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader)
            user = header.index("user")
            for row in reader:
                raters, abusive = _convabuse_votes(header, row)
                text = row[user]
                if not raters or not text.strip():
                    continue
                if abusive * 2 > raters:
                    rows.append((text, {"HR": 1}, 1))
                elif abusive == 0:
                    rows.append((text, {"HR": 0}, 0))
    return _build(f"convabuse:{split or 'all'}", files, "CC-BY-4.0", rows)


EDOS_FILE = Path("edos_sexism") / "edos_labelled_aggregated.csv"


def load_edos(datasets_dir: Path, split: Split | None = "train") -> LabelledSet:
    """EDOS sexism (CC0), Gab and Reddit. Categories 1 (threats) and 2 (derogation) -> H=1; 3 (animosity) and
    4 (prejudiced discussion) are sexist but not clearly hate under the policy: dropped. Not sexist -> H=0 only (a
    post can be not sexist and still racist), never an ``any`` row. ``train`` = official train + dev.

    Threats are not mapped to H2 (hate/threatening): EDOS "threats" include incitement and wishes that the
    OpenAI taxonomy files elsewhere, and with them the H2 head lost 0.16 ROC-AUC on the OpenAI set."""
    path = dataset_file(datasets_dir, EDOS_FILE)
    wanted = {"train": ("train", "dev"), "test": ("test",), None: ("train", "dev", "test")}[split]
    rows = []
    for r in _csv_rows(path):
        if r["split"] not in wanted:
            continue
        category = r["label_category"]
        if r["label_sexist"] == "not sexist":
            rows.append((r["text"], {"H": 0}, ANY_DROP))
        elif category.startswith(("1.", "2.")):
            rows.append((r["text"], {"H": 1}, 1))
    return _build(f"edos:{split or 'all'}", [(path, EDOS_FILE)], "CC0-1.0", rows)


HATEMOJI_BUILD_FILES = {s: Path("hatemoji") / "HatemojiBuild" / f"{s}.csv" for s in ("train", "validation", "test")}
HATEMOJI_CHECK_FILE = Path("hatemoji") / "HatemojiCheck" / "test.csv"


def load_hatemoji_build(datasets_dir: Path, split: Split | None = "train") -> LabelledSet:
    """HatemojiBuild (CC-BY-4.0): adversarial emoji hate. ``label_gold`` 1 -> H=1, 0 -> H=0 and not a violation
    (the non-hateful rows are perturbations written to be safe). ``train`` = official train + validation."""
    parts = {"train": ("train", "validation"), "test": ("test",), None: ("train", "validation", "test")}[split]
    rows, files = [], []
    for part in parts:
        rel = HATEMOJI_BUILD_FILES[part]
        path = dataset_file(datasets_dir, rel)
        files.append((path, rel))
        for r in _csv_rows(path):
            hateful = int(r["label_gold"] == "1")
            rows.append((r["text"], {"H": hateful}, hateful))
    return _build(f"hatemoji_build:{split or 'all'}", files, "CC-BY-4.0", rows)


WIKI_GC_FILE = Path("context_toxicity") / "gc.csv"
WIKI_GN_FILE = Path("context_toxicity") / "gn.csv"


def load_wiki_toxicity(datasets_dir: Path, which: str = "gn") -> LabelledSet:
    """Wikipedia Talk comments (repository Apache-2.0; text CC BY-SA). ``label`` 1 toxic -> a violation (no
    category: "toxic" spans harassment, hate and plain rudeness), 0 -> not. ``gn`` (rated without the parent
    comment, 0.6 % toxic) is evaluation-only: it is the bulk of the realistic-traffic mix; ``gc`` may train."""
    rel = WIKI_GN_FILE if which == "gn" else WIKI_GC_FILE
    path = dataset_file(datasets_dir, rel)
    rows = [(r["text"], {}, int(r["label"] == "1")) for r in _csv_rows(path) if r["text"].strip()]
    return _build(f"wiki_toxicity:{which}", [(path, rel)], "Apache-2.0 (text CC BY-SA)", rows)


# --- traps and non-English evaluation sets ---------------------------------------------------------------------

HATEMOJI_LICENSE = "CC-BY-4.0"


def load_hatemoji_check(datasets_dir: Path) -> LabelledSet:
    """HatemojiCheck (CC-BY-4.0): emoji hate functional tests, evaluation only (binary)."""
    path = dataset_file(datasets_dir, HATEMOJI_CHECK_FILE)
    rows = [(r["text"], {}, int(r["label_gold"] == "1")) for r in _csv_rows(path)]
    return _build("hatemoji_check", [(path, HATEMOJI_CHECK_FILE)], HATEMOJI_LICENSE, rows)


SST_FILE = Path("simple_safety_tests") / "test_cases.csv"


def load_simple_safety_tests(datasets_dir: Path) -> LabelledSet:
    """SimpleSafetyTests (CC-BY-4.0): 100 prompts that must all be flagged; a recall smoke test."""
    path = dataset_file(datasets_dir, SST_FILE)
    rows = [(r["prompts_final"], {}, 1) for r in _csv_rows(path)]
    return _build("simple_safety_tests", [(path, SST_FILE)], "CC-BY-4.0", rows)


MHC_LANGUAGES = {"arabic": "ar", "dutch": "nl", "french": "fr", "german": "de", "hindi": "hi", "italian": "it",
                 "mandarin": "zh", "polish": "pl", "portuguese": "pt", "spanish": "es"}


def load_multilingual_hatecheck(datasets_dir: Path, language: str) -> LabelledSet:
    """Multilingual HateCheck (CC-BY-4.0), one language: hateful -> H=1 and a violation, non-hateful -> not."""
    rel = Path("multilingual_hatecheck") / "cases" / f"{language}.csv"
    path = dataset_file(datasets_dir, rel)
    rows = [(r["test_case"], {}, int(r["label_gold"] == "hateful")) for r in _csv_rows(path)]
    return _build(f"mhc_{language}", [(path, rel)], "CC-BY-4.0", rows, language=MHC_LANGUAGES[language])


GERMEVAL_FILES = {"train": Path("germeval2018_german") / "germeval2018.training.txt",
                  "test": Path("germeval2018_german") / "germeval2018.test.txt"}


def load_germeval(datasets_dir: Path, split: Split = "test") -> LabelledSet:
    """GermEval 2018 (CC-BY-4.0), German tweets. ABUSE -> H=1, INSULT -> HR=1, OTHER -> not a violation;
    PROFANITY (swearing, which no policy here forbids) dropped."""
    rel = GERMEVAL_FILES[split]
    path = dataset_file(datasets_dir, rel)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        text, fine = parts[0], parts[2].strip()
        if fine == "ABUSE":
            rows.append((text, {"H": 1}, 1))
        elif fine == "INSULT":
            rows.append((text, {"HR": 1}, 1))
        elif fine == "OTHER":
            rows.append((text, {}, 0))
    return _build(f"germeval:{split}", [(path, rel)], "CC-BY-4.0", rows, language="de")


DKHATE_FILES = {"train": Path("dkhate_danish") / "offenseval-da-training-v1.tsv",
                "test": Path("dkhate_danish") / "offenseval-da-test-v1.tsv"}


def load_dkhate(datasets_dir: Path, split: Split = "test") -> LabelledSet:
    """DKHate (CC-BY-4.0), Danish comments: OFF -> a violation, NOT -> not. OFF includes plain profanity, so
    auto-decided accuracy against it is a lower bound."""
    rel = DKHATE_FILES[split]
    path = dataset_file(datasets_dir, rel)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines()[1:]:
        parts = line.split("\t")
        if len(parts) < 3:
            parts = line.rsplit(" ", 1)  # the last training line is space-separated
            parts = ["", *parts] if len(parts) == 2 else parts
        label = parts[-1].strip()
        if label in ("OFF", "NOT"):
            rows.append(("\t".join(parts[1:-1]).strip(), {}, int(label == "OFF")))
    return _build(f"dkhate:{split}", [(path, rel)], "CC-BY-4.0", rows, language="da")


COLD_FILES = {s: Path("cold_chinese") / f"{s}.csv" for s in ("train", "dev", "test")}


def load_cold(datasets_dir: Path, split: Split = "test") -> LabelledSet:
    """COLD (Apache-2.0), Chinese comments on race, gender and region: ``label`` 1 offensive -> a violation."""
    rel = COLD_FILES[split]
    path = dataset_file(datasets_dir, rel)
    rows = [(r["TEXT"], {}, int(r["label"] == "1")) for r in _csv_rows(path, encoding="utf-8-sig")]
    return _build(f"cold:{split}", [(path, rel)], "Apache-2.0", rows, language="zh")


Loader = Callable[[Path], LabelledSet]

#: Extra English training sources (train splits only) the default recipe adds to the OpenAI set.
TRAINING_SOURCES: dict[str, Loader] = {
    "davidson": lambda d: load_davidson(d, "train"),
    "convabuse": lambda d: load_convabuse(d, "train"),
    "edos": lambda d: load_edos(d, "train"),
    "hatemoji_build": lambda d: load_hatemoji_build(d, "train"),
}

#: Evaluation-only sets by name (``modpipe triage eval --dataset NAME``): never in any training recipe.
EVALUATION_SETS: dict[str, Loader] = {
    "davidson_test": lambda d: load_davidson(d, "test"),
    "convabuse_test": lambda d: load_convabuse(d, "test"),
    "edos_test": lambda d: load_edos(d, "test"),
    "hatemoji_build_test": lambda d: load_hatemoji_build(d, "test"),
    "hatemoji_check": load_hatemoji_check,
    "wiki_toxicity": lambda d: load_wiki_toxicity(d, "gn"),
    "simple_safety_tests": load_simple_safety_tests,
    "germeval_test": lambda d: load_germeval(d, "test"),
    "dkhate_test": lambda d: load_dkhate(d, "test"),
    "cold_test": lambda d: load_cold(d, "test"),
    **{f"mhc_{lang}": (lambda d, lang=lang: load_multilingual_hatecheck(d, lang)) for lang in MHC_LANGUAGES},
}

ROLES = {**{n: "train" for n in TRAINING_SOURCES}, **{n: "evaluation" for n in EVALUATION_SETS}}


def load_training_sources(datasets_dir: Path, names: list[str] | None = None) -> list[LabelledSet]:
    """The extra training sets by name (default: all of :data:`TRAINING_SOURCES`)."""
    chosen = list(TRAINING_SOURCES) if names is None else names
    unknown = [n for n in chosen if n not in TRAINING_SOURCES]
    if unknown:
        raise ValueError(f"unknown training source(s) {unknown}; choose from {sorted(TRAINING_SOURCES)}")
    return [TRAINING_SOURCES[n](datasets_dir) for n in chosen]


def describe() -> str:
    """One JSON line per source with its role, for docs and ``--help``."""
    return "\n".join(json.dumps({"name": n, "role": r}) for n, r in ROLES.items())
