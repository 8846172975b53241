"""A realistic-traffic evaluation mix: mostly benign chat and comments, a few per cent violating.

Why: the OpenAI moderation set is 31 % violating, so bands and escalation rates measured on it say little about
a platform where 2-10 % of posts break a rule. This mix is built only from permissively licensed,
evaluation-only rows (never in any training recipe) and keeps every row's source:

* Wikipedia Talk comments rated without context (``context_toxicity/gn.csv``, 10,000 rows, 0.6 % toxic);
* user turns to chatbots (ConvAbuse official test split, majority-abusive vs no-rater-abusive rows);
* tweets (Davidson, the hash-held-out test part: hate speech vs neither; offensive-only tweets are left out).

The order is a stable shuffle by a hash of each text, so the mix and its sha256 are the same on every machine.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from triage_models.data import LabelledSet
from triage_models.sources import (
    MHC_LANGUAGES,
    load_cold,
    load_convabuse,
    load_davidson,
    load_dkhate,
    load_germeval,
    load_multilingual_hatecheck,
    load_wiki_toxicity,
)


def stable_order(texts: list[str], salt: str = "mix") -> np.ndarray:
    """A permutation of ``range(len(texts))`` that depends only on the texts (sha256 of salt + text)."""
    keys = [hashlib.sha256((salt + "\0" + t).encode("utf-8")).digest() for t in texts]
    return np.asarray(sorted(range(len(texts)), key=lambda i: (keys[i], i)), dtype=np.int64)


def concat(name: str, parts: list[LabelledSet], shuffle: bool = True) -> LabelledSet:
    """``parts`` merged into one set (categories unknown where a part lacks them), in a stable shuffled order."""
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merged(part)
    if not shuffle:
        return merged
    order = stable_order(merged.texts)
    override = merged.any_override if merged.any_override is not None else None
    digest = hashlib.sha256(("".join(s["sha256"] for s in merged.sources) + name).encode()).hexdigest()
    return LabelledSet(name=name, texts=[merged.texts[i] for i in order],
                       labels={c: v[order] for c, v in merged.labels.items()}, sha256=digest,
                       any_override=override[order] if override is not None else None, sources=merged.sources)


def without_texts(data: LabelledSet, texts: set[str]) -> LabelledSet:
    """``data`` minus the rows whose text is in ``texts``."""
    keep = np.asarray([i for i, t in enumerate(data.texts) if t not in texts], dtype=np.int64)
    override = data.any_override[keep] if data.any_override is not None else None
    return LabelledSet(name=data.name, texts=[data.texts[i] for i in keep],
                       labels={c: v[keep] for c, v in data.labels.items()}, sha256=data.sha256,
                       any_override=override, sources=tuple({**s, "rows": len(keep)} for s in data.sources))


def load_realistic_mix(datasets_dir: Path) -> LabelledSet:
    """Wikipedia Talk (gn) + ConvAbuse test + Davidson test (hate vs neither), about 4 % violating.

    Chat repeats itself ("hi", "fuck you" occur in ConvAbuse's train and test splits alike): a text that also
    occurs in any training source is left out, so no evaluated text was trained on.
    """
    from triage_models.sources import load_training_sources

    trained = {t for s in load_training_sources(datasets_dir) for t in s.texts}
    parts = [load_wiki_toxicity(datasets_dir, "gn"), load_convabuse(datasets_dir, "test"),
             load_davidson(datasets_dir, "test")]
    return concat("realistic_mix", [without_texts(p, trained) for p in parts])


def sample(data: LabelledSet, rows: int, salt: str) -> LabelledSet:
    """The first ``rows`` of ``data`` in :func:`stable_order` (all of it when smaller)."""
    keep = np.sort(stable_order(data.texts, salt)[:rows])
    override = data.any_override[keep] if data.any_override is not None else None
    return LabelledSet(name=f"{data.name}[{len(keep)}]", texts=[data.texts[i] for i in keep],
                       labels={c: v[keep] for c, v in data.labels.items()}, sha256=data.sha256,
                       any_override=override, sources=tuple({**s, "rows": len(keep)} for s in data.sources))


#: Rows per language taken from each non-English set: enough for +-4 % on a rate, cheap to embed.
MULTILINGUAL_ROWS = 400


def multilingual_sets(datasets_dir: Path, rows: int = MULTILINGUAL_ROWS) -> dict[str, LabelledSet]:
    """One stable sample per non-English set and language: Multilingual HateCheck (10 languages), GermEval 2018
    (de), DKHate (da) and COLD (zh) test splits. Keyed by ``<set>:<language code>``."""
    out = {f"mhc:{code}": sample(load_multilingual_hatecheck(datasets_dir, lang), rows, "ml")
           for lang, code in MHC_LANGUAGES.items()}
    out["germeval:de"] = sample(load_germeval(datasets_dir, "test"), rows, "ml")
    out["dkhate:da"] = sample(load_dkhate(datasets_dir, "test"), rows, "ml")
    out["cold:zh"] = sample(load_cold(datasets_dir, "test"), rows, "ml")
    return out


def load_multilingual_mix(datasets_dir: Path) -> LabelledSet:
    """Every :func:`multilingual_sets` sample in one set (each row keeps its source's language)."""
    return concat("multilingual_mix", list(multilingual_sets(datasets_dir).values()), shuffle=False)


MIXES: dict[str, Callable[[Path], LabelledSet]] = {"realistic_mix": load_realistic_mix,
                                                    "multilingual_mix": load_multilingual_mix}
