"""Hostile messages for ``modpipe chaos --poison``: each must end as exactly one dead letter with a clear reason
(or, for hostile headers on a valid item, as an ordinary verdict), and none may stop any other message.

The content id (the run id) comes first in every value, so that a dead letter that keeps only a prefix of a huge
value still names the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pipeline.schemas import ContentItem

#: kind -> the dead-letter error type expected (None: a valid item that must get a verdict)
POISON_KINDS: dict[str, str | None] = {
    "oversized": "ContentTooLarge",  # 5 MiB: over limits.max_message_bytes, under what the broker accepts
    "deep": "SchemaError",  # 50,000 levels of nesting in 100 KB
    "lone_surrogate": "SchemaError",  # "\\ud800": a valid JSON escape, not a Unicode character
    "latin1_bytes": "SchemaError",  # not UTF-8 at all
    "nul_bytes": "SchemaError",  # a NUL byte outside any string
    "huge_key": "SchemaError",  # a 100 KiB key on an otherwise valid item
    "headers": None,  # 64 headers of 1 KiB each on a valid item: ignored, the item is judged
}


@dataclass(frozen=True)
class Poison:
    kind: str
    content_id: str
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]

    @property
    def expected_error(self) -> str | None:
        return POISON_KINDS[self.kind]


def poison_messages(run_id: str, rounds: int = 1) -> Iterator[Poison]:
    """``rounds`` messages of every kind in :data:`POISON_KINDS`."""
    for r in range(rounds):
        for kind in POISON_KINDS:
            cid = f"{run_id}-poison-{kind}-{r}"
            head = '{"content_id": "' + cid + '", '
            headers: list[tuple[str, bytes]] = []
            key = cid.encode()
            if kind == "oversized":
                value = (head + '"text": "' + "x" * (5 * 1024 * 1024) + '"}').encode()
            elif kind == "deep":
                value = (head + '"text": "deep", "policy_ids": ' + "[" * 50_000 + "]" * 50_000 + "}").encode()
            elif kind == "lone_surrogate":
                value = (head + '"text": "a valid post with a broken \\ud800 character"}').encode()
            elif kind == "latin1_bytes":
                value = (head + '"text": "caf').encode() + "é déjà".encode("latin-1") + b'"}'
            elif kind == "nul_bytes":
                value = (head + '"text": "x"}').encode() + b"\x00"
            elif kind == "huge_key":
                value = ContentItem(content_id=cid, text="a fine post under a silly key").to_bytes()
                key = b"k" * (100 * 1024)
            else:
                value = ContentItem(content_id=cid, text="good morning, lovely weather today").to_bytes()
                headers = [(f"h{i}", b"v" * 1024) for i in range(64)]
            yield Poison(kind, cid, key, value, headers)


__all__ = ["POISON_KINDS", "Poison", "poison_messages"]
