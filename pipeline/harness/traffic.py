"""Sample traffic from the shipped datasets, and deliberately malformed messages for chaos runs."""

from __future__ import annotations

import gzip
import json
import random
from collections.abc import Iterator
from pathlib import Path

from pipeline.config import PROJECT_ROOT
from pipeline.schemas import ContentItem

SAMPLE_DATASET = PROJECT_ROOT / "triage_models" / "data" / "openai_moderation" / "samples-1680.jsonl.gz"


def sample_texts(n: int, seed: int = 0, dataset: Path = SAMPLE_DATASET) -> list[str]:
    """``n`` texts drawn (with a fixed seed, repeating if needed) from the OpenAI moderation evaluation set."""
    with gzip.open(dataset, "rt", encoding="utf-8") as fh:
        texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    return [texts[order[i % len(order)]] for i in range(n)]


def sample_items(n: int, run_id: str, seed: int = 0) -> list[ContentItem]:
    return [
        ContentItem(content_id=f"{run_id}-{i:06d}", text=text, platform="demo", author_id=f"author-{i % 97}")
        for i, text in enumerate(sample_texts(n, seed))
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
