import json

import pytest

from pipeline.codec import check_key, decode_content_item, decode_model, json_depth, sniff_content_id
from pipeline.errors import ContentTooLarge, SchemaError
from pipeline.schemas import ContentItem, Escalation
from pipeline.harness.traffic import MALFORMED_KINDS, malformed_messages

pytestmark = pytest.mark.unit

SECRET = "my very private text"


def test_valid_item_decodes() -> None:
    item = decode_content_item(json.dumps({"content_id": "a-1", "text": "hello"}).encode(), 100)
    assert item.content_id == "a-1" and item.text == "hello" and item.created_at.tzinfo is not None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "no value"),
        (b"", "no value"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"text": "x\xff"}', "not valid UTF-8"),
        (json.dumps({"content_id": "a"}).encode(), "text: Field required"),
        (json.dumps({"content_id": "a", "text": 5}).encode(), "text: Input should be a valid string"),
        (json.dumps({"content_id": "a", "text": "x", "extra": 1}).encode(), "extra: Extra inputs"),
        (json.dumps({"content_id": "bad id!", "text": "x"}).encode(), "content_id"),
        (json.dumps({"content_id": "a", "text": "x", "created_at": "2024-01-01T00:00:00"}).encode(), "timezone"),
    ],
)
def test_bad_input_raises_schema_error_saying_why(value: bytes | None, message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        decode_content_item(value, 100)


def test_schema_error_never_echoes_content() -> None:
    value = json.dumps({"content_id": "a", "text": SECRET, "author_id": SECRET * 20}).encode()
    with pytest.raises(SchemaError) as info:
        decode_content_item(value, 1000)
    assert SECRET not in str(info.value)


def test_text_over_limit_is_too_large() -> None:
    with pytest.raises(ContentTooLarge, match="over the 10-character limit"):
        decode_content_item(json.dumps({"content_id": "a", "text": "x" * 11}).encode(), 10)


def test_huge_raw_message_rejected_before_parsing() -> None:
    with pytest.raises(ContentTooLarge, match="bytes"):
        decode_content_item(b"{" + b" " * 10_000_000 + b"}", 10)


def test_every_malformed_kind_is_rejected() -> None:
    messages = list(malformed_messages(len(MALFORMED_KINDS), "run", 50))
    assert [kind for kind, _, _ in messages] == list(MALFORMED_KINDS)
    for _, _, value in messages:
        with pytest.raises((SchemaError, ContentTooLarge)):
            decode_content_item(value, 50)


def test_sniff_content_id_finds_nested_and_rejects_garbage() -> None:
    assert sniff_content_id(json.dumps({"content_id": "c-1"}).encode()) == "c-1"
    assert sniff_content_id(json.dumps({"item": {"content_id": "c-2"}}).encode()) == "c-2"
    assert sniff_content_id(b"\xff\xfe") is None
    assert sniff_content_id(json.dumps({"content_id": "bad id!"}).encode()) is None


def test_decode_model_for_other_wire_models() -> None:
    with pytest.raises(SchemaError, match="invalid Escalation"):
        decode_model(json.dumps({"item": {}}).encode(), Escalation)
    item = ContentItem(content_id="x", text="t")
    assert decode_model(item.to_bytes(), ContentItem) == item


def test_deep_nesting_is_rejected_before_parsing() -> None:
    deep = b'{"content_id": "d", "text": "x", "policy_ids": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    with pytest.raises(SchemaError, match="nests 50001 levels deep, over the 32-level limit"):
        decode_content_item(deep, 100_000)
    with pytest.raises(SchemaError, match="over the 3-level limit"):
        decode_model(b'{"a": [[[1]]]}', ContentItem, max_depth=3)


def test_brackets_inside_strings_do_not_count_as_depth() -> None:
    text = "[[[[{{{{" * 20 + '\\"[['
    item = decode_content_item(json.dumps({"content_id": "b", "text": text}).encode(), 1000)
    assert item.text.startswith("[[[[")
    assert json_depth(b'{"a": "[[[", "b": [{"c": "]]"}]}') == 3


def test_a_lone_surrogate_is_an_encoding_error_and_a_pair_is_text() -> None:
    with pytest.raises(SchemaError, match="lone UTF-16 surrogate") as info:
        decode_content_item(b'{"content_id": "s", "text": "' + SECRET.encode() + b' \\ud800"}', 1000)
    assert SECRET not in str(info.value)
    assert decode_content_item(b'{"content_id": "s", "text": "ok \\ud83d\\ude00"}', 1000).text == "ok \U0001f600"


def test_the_byte_limit_applies_before_decoding() -> None:
    value = json.dumps({"content_id": "a", "text": "x" * 5000}).encode()
    with pytest.raises(ContentTooLarge, match="over the 2048-byte limit"):
        decode_content_item(value, 20_000, max_bytes=2048)


def test_key_limit() -> None:
    check_key(b"k" * 10, 10)
    check_key(None, 10)
    with pytest.raises(SchemaError, match="key is 11 bytes, over the 10-byte limit"):
        check_key(b"k" * 11, 10)


def test_sniffing_never_parses_a_deep_value() -> None:
    assert sniff_content_id(b'{"content_id": "c", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}") is None
