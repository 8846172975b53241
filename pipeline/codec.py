"""Decoding at the edge: raw Kafka bytes to wire models, with errors that say what is wrong but never echo content.

pydantic's own messages include the offending input, which may be the user's text; we rebuild them from the error
locations and types only.

Every limit is checked before the expensive step it protects: the byte size before decoding, the JSON nesting
depth before parsing (a 100 KB value nested 50,000 levels deep makes ``json.loads`` raise RecursionError), and
every string is checked to be encodable text (a lone surrogate such as ``"\\ud800"`` is a valid JSON escape, but
no tokenizer or UTF-8 encoder accepts it). A message that breaks a limit is a :class:`SchemaError` or
:class:`ContentTooLarge`, so it becomes a dead letter that says which limit, never a crash.
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
DEFAULT_MAX_DEPTH = 32  # LimitsSettings.max_json_depth's default; the deepest wire model nests about 5 levels
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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


def json_depth(value: bytes) -> int:
    """The deepest nesting of objects and arrays in a JSON document (brackets inside strings do not count).

    Cheap for ordinary messages: only a value with more brackets than the limit is scanned bracket by bracket.
    """
    depth = deepest = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b"", value)):
        if match.group() in (b"[", b"{"):
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def check_depth(value: bytes, max_depth: int) -> None:
    """Raise :class:`SchemaError` for a JSON value nested deeper than ``max_depth``."""
    if value.count(b"[") + value.count(b"{") > max_depth and (depth := json_depth(value)) > max_depth:
        raise SchemaError(f"message value nests {depth} levels deep, over the {max_depth}-level limit")


def _unencodable(data: object, where: str = "") -> str | None:
    """The path of the first string (key or value) in ``data`` that is not valid Unicode text, or None."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError as exc:
            return f"{where or '<root>'} (character {exc.start})"
        return None
    if isinstance(data, dict):
        for key, item in data.items():
            found = _unencodable(key, f"{where}.<key>" if where else "<key>") or _unencodable(
                item, f"{where}.{key}" if where else str(key)
            )
            if found:
                return found
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if found := _unencodable(item, f"{where}.{i}" if where else str(i)):
                return found
    return None


def decode_model(
    value: bytes | None, model: type[ModelT], max_bytes: int | None = None, max_depth: int = DEFAULT_MAX_DEPTH
) -> ModelT:
    """Decode one message value into ``model`` or raise :class:`SchemaError` saying why."""
    if value is None or len(value) == 0:
        raise SchemaError("message has no value")
    if max_bytes is not None and len(value) > max_bytes:
        raise ContentTooLarge(f"message value is {len(value)} bytes, over the {max_bytes}-byte limit")
    try:
        text = value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"message value is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    check_depth(value, max_depth)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SchemaError(f"message value is not valid JSON ({exc.msg} at line {exc.lineno} col {exc.colno})") from None
    except RecursionError:  # the depth check makes this unreachable; kept so that no input can crash a worker
        raise SchemaError("message value nests too deeply to parse") from None
    if not isinstance(data, dict):
        raise SchemaError(f"message value must be a JSON object, got {type(data).__name__}")
    if _SURROGATE_ESCAPE.search(value) and (where := _unencodable(data)):
        raise SchemaError(f"invalid text encoding: {where} holds a lone UTF-16 surrogate (not a Unicode character)")
    try:
        return validate_wire(model, data)  # type: ignore[type-var]
    except ValidationError as exc:
        raise SchemaError(f"invalid {model.__name__}: {describe_validation_error(exc)}") from None
    except RecursionError:
        raise SchemaError(f"invalid {model.__name__}: nests too deeply to validate") from None


def check_key(key: bytes | None, max_key_bytes: int) -> None:
    """Raise :class:`SchemaError` for a message key longer than ``max_key_bytes``."""
    if key is not None and len(key) > max_key_bytes:
        raise SchemaError(f"message key is {len(key)} bytes, over the {max_key_bytes}-byte limit")


def decode_content_item(
    value: bytes | None, max_text_chars: int, max_bytes: int | None = None, max_depth: int = DEFAULT_MAX_DEPTH
) -> ContentItem:
    """Decode a ``content.incoming`` message; texts over ``max_text_chars`` raise :class:`ContentTooLarge`.

    The byte limit is the smaller of ``max_bytes`` and what the longest allowed text can take as JSON.
    """
    ceiling = max_text_chars * _RAW_BYTES_PER_CHAR + 64 * 1024
    item = decode_model(value, ContentItem, max_bytes=min(ceiling, max_bytes or ceiling), max_depth=max_depth)
    if len(item.text) > max_text_chars:
        raise ContentTooLarge(f"text is {len(item.text)} characters, over the {max_text_chars}-character limit")
    return item


def sniff_content_id(value: bytes | None) -> str | None:
    """Best effort: the content id of a message that failed to decode, for the dead letter. Never raises."""
    if not value:
        return None
    if len(value) > 4 * 1024 * 1024:
        return None  # too big to parse for a best effort: the dead letter goes without a content id
    try:
        check_depth(value, DEFAULT_MAX_DEPTH)
    except SchemaError:
        return None
    try:
        data = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    candidate = data.get("content_id")
    if candidate is None and isinstance(data.get("item"), dict):
        candidate = data["item"].get("content_id")
    if isinstance(candidate, str) and _CONTENT_ID_RE.match(candidate):
        return candidate
    return None
