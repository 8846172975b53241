"""Decoding at the edge: raw Kafka bytes to wire models, with errors that say what is wrong but never echo content.

pydantic's own messages include the offending input, which may be the user's text; we rebuild them from the error
locations and types only.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pipeline.errors import ContentTooLarge, SchemaError
from pipeline.schemas import CONTENT_ID_PATTERN, ContentItem, validate_wire

ModelT = TypeVar("ModelT", bound=BaseModel)

_CONTENT_ID_RE = re.compile(CONTENT_ID_PATTERN)
# A hard ceiling on the raw message before we even parse it: JSON escaping can at most ~6x a text's length.
_RAW_BYTES_PER_CHAR = 6


@dataclass(frozen=True)
class Record:
    """One consumed message, independent of the consumer library, so the handlers test without Kafka."""

    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None

    @property
    def where(self) -> str:
        """``topic[partition]@offset``: how every log line names a message."""
        return f"{self.topic}[{self.partition}]@{self.offset}"

    @property
    def message_id(self) -> str:
        """Where the message sits in the log plus a digest of its bytes: the same for a redelivered or replayed
        message, different for a new message at a reused offset (a recreated topic, a restarted in-memory broker)."""
        digest = hashlib.sha256(self.value or b"").hexdigest()[:16]
        return f"{self.topic}|{self.partition}|{self.offset}|{digest}"


def describe_validation_error(exc: ValidationError) -> str:
    """``field: problem`` pairs, without the input values (they may be user content)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in error["loc"]) or "<root>"
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)


def decode_model(value: bytes | None, model: type[ModelT], max_bytes: int | None = None) -> ModelT:
    """Decode one message value into ``model`` or raise :class:`SchemaError` saying why."""
    if value is None or len(value) == 0:
        raise SchemaError("message has no value")
    if max_bytes is not None and len(value) > max_bytes:
        raise ContentTooLarge(f"message value is {len(value)} bytes, over the {max_bytes}-byte limit")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"message value is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"message value is not valid JSON ({exc.msg} at line {exc.lineno} col {exc.colno})") from None
    if not isinstance(data, dict):
        raise SchemaError(f"message value must be a JSON object, got {type(data).__name__}")
    try:
        return validate_wire(model, data)  # type: ignore[type-var]
    except ValidationError as exc:
        raise SchemaError(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None


def decode_content_item(value: bytes | None, max_text_chars: int) -> ContentItem:
    """Decode a ``content.incoming`` message; texts over ``max_text_chars`` raise :class:`ContentTooLarge`."""
    item = decode_model(value, ContentItem, max_bytes=max_text_chars * _RAW_BYTES_PER_CHAR + 64 * 1024)
    if len(item.text) > max_text_chars:
        raise ContentTooLarge(f"text is {len(item.text)} characters, over the {max_text_chars}-character limit")
    return item


def sniff_content_id(value: bytes | None) -> str | None:
    """Best effort: the content id of a message that failed to decode, for the dead letter. Never raises."""
    if not value:
        return None
    try:
        data = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    candidate = data.get("content_id")
    if candidate is None and isinstance(data.get("item"), dict):
        candidate = data["item"].get("content_id")
    if isinstance(candidate, str) and _CONTENT_ID_RE.match(candidate):
        return candidate
    return None
