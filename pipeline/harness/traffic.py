"""Sample traffic the project wrote itself, and deliberately malformed messages for chaos runs.

``sample_traffic.jsonl`` (next to this module) holds a few hundred short posts written for modpipe, one JSON
object a line: ``{"text": str, "kind": "benign" | "spam" | "rude" | "violating" | "borderline"}``. About 70 %
are benign (everyday chat, product questions, news talk, gaming banter); the rest are spam and scams, rude but
allowed insults, mild synthetic violations (threats, hate against a protected group without slurs, self-harm
encouragement, doxxing) and posts near a policy's boundary (quoted threats in news, homonyms such as killing a
process, dark humour, counter-speech), so a demo run exercises allow, block, escalation and review. It is ours,
so a fresh clone runs the demo, chaos, the benches and the e2e tests without the shared datasets folder.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

from pipeline.schemas import ContentItem

SAMPLE_TRAFFIC = Path(__file__).resolve().parent / "sample_traffic.jsonl"


def sample_posts(path: Path = SAMPLE_TRAFFIC) -> list[dict[str, str]]:
    """Every post of the sample file, in file order: ``{"text": ..., "kind": ...}``."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


#: Letters only, so ``@<handle><lap>`` can never spell another handle's prefix.
_REPLY_HANDLES = ("mika", "dantheman", "sunnydays", "kt", "oldmate", "pixelpaws", "jobakes", "northstar")


def sample_texts(n: int, seed: int = 0, dataset: Path = SAMPLE_TRAFFIC, *, distinct: bool = False,
                 start: int = 0) -> list[str]:
    """``n`` texts drawn (with a fixed seed, repeating if needed) from the project's sample traffic.

    ``distinct``: every pass over the pool after the first turns its posts into replies (``"@kt2 " + text``), so no
    text repeats. Benches that need more texts than the pool holds use it: a repeated text would be served by the
    embedding and verdict caches and flatter the numbers. ``start`` continues the same sequence (texts ``start`` ..
    ``start + n - 1``), so phases of one run (a warm-up, then rounds) never repeat each other's texts: two calls
    with different seeds still share the pool's first pass.
    """
    texts = [post["text"] for post in sample_posts(dataset)]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    out = []
    for i in range(start, start + n):
        lap, index = divmod(i, len(order))
        text = texts[order[index]]
        if distinct and lap:
            text = f"@{_REPLY_HANDLES[i % len(_REPLY_HANDLES)]}{lap} {text}"
        out.append(text)
    return out


def sample_items(n: int, run_id: str, seed: int = 0, *, distinct: bool = False, start: int = 0) -> list[ContentItem]:
    """``n`` items of :func:`sample_texts` (ids ``<run_id>-<position>``: positions are unique within a sequence)."""
    return [
        ContentItem(content_id=f"{run_id}-{i:06d}", text=text, platform="demo", author_id=f"author-{i % 97}")
        for i, text in enumerate(sample_texts(n, seed, distinct=distinct, start=start), start=start)
    ]


MALFORMED_KINDS = ("invalid_json", "missing_field", "wrong_type", "invalid_utf8", "too_large")


def malformed_messages(m: int, run_id: str, max_text_chars: int) -> Iterator[tuple[str, bytes, bytes]]:
    """``m`` bad messages ``(kind, key, value)`` cycling through every kind of bad input the edge must catch."""
    for i in range(m):
        kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
        cid = f"{run_id}-bad-{i:04d}"
        if kind == "invalid_json":
            value = b'{"content_id": "' + cid.encode() + b'", "text": "unterminated'
        elif kind == "missing_field":
            value = json.dumps({"content_id": cid}).encode()
        elif kind == "wrong_type":
            value = json.dumps({"content_id": cid, "text": 12345}).encode()
        elif kind == "invalid_utf8":
            value = b'{"content_id": "' + cid.encode() + b'", "text": "caf\xc3\x28 \xff"}'
        else:
            value = json.dumps({"content_id": cid, "text": "x" * (max_text_chars + 1)}).encode()
        yield kind, cid.encode(), value
