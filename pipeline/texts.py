"""What makes two texts the same: the normalisation behind revision identity and the verdict cache.

Normalisation is deliberately conservative (Unicode NFKC, zero-width characters removed, runs of whitespace
collapsed, ends stripped) so two texts count as one only when a reader could not tell them apart; case is kept
("KILL THEM" and "kill them" may read differently). Lone surrogates (valid JSON escapes, invalid Unicode) are kept
as code points, so hashing never fails on hostile input.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_SPACES = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    return _SPACES.sub(" ", _ZERO_WIDTH.sub("", unicodedata.normalize("NFKC", text))).strip()


def text_hash(text: str) -> str:
    """sha256 (hex) of the normalised text."""
    return hashlib.sha256(normalise_text(text).encode("utf-8", "surrogatepass")).hexdigest()
