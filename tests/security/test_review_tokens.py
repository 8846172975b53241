"""Token records and scoping rules that need no service: who a token is, which platform it may see."""

from __future__ import annotations

import json

import pytest

from pipeline.review.auth import InvalidPrincipal, Principal, Role, check_principal, principal_from_record

pytestmark = pytest.mark.unit


def test_a_platform_token_sees_only_its_platform_and_no_one_sees_items_of_none() -> None:
    shop = Principal("shop-web", Role.PLATFORM, "shop")
    assert shop.owns("shop") and not shop.owns("forum") and not shop.owns(None) and not shop.owns("")
    assert not Principal("alice", Role.REVIEWER).owns("shop")  # owns() is the platform rule; staff are not scoped


def test_records_name_their_platform_and_older_platform_records_use_their_id() -> None:
    def platform_of(record: dict) -> str | None:
        return principal_from_record(json.dumps(record)).platform

    assert platform_of({"id": "shop-web", "role": "platform", "platform": "shop"}) == "shop"
    assert platform_of({"id": "shop", "role": "platform", "created_at": 1.0}) == "shop"
    assert platform_of({"id": "alice", "role": "reviewer", "platform": "shop"}) is None


@pytest.mark.parametrize(("principal_id", "role", "platform", "field"), [
    ("", Role.REVIEWER, None, "principal_id"),
    ("a b", Role.REVIEWER, None, "principal_id"),
    ("x" * 65, Role.ADMIN, None, "principal_id"),
    ("alice", Role.REVIEWER, "shop", "platform"),
    ("shop", Role.PLATFORM, "", "platform"),
    ("shop", Role.PLATFORM, "p" * 65, "platform"),
    ("shop", Role.PLATFORM, "bad\nname", "platform"),
])
def test_the_store_refuses_bad_ids_and_platforms(principal_id: str, role: Role, platform: str | None,
                                                  field: str) -> None:
    with pytest.raises(InvalidPrincipal) as refused:
        check_principal(principal_id, role, platform)
    assert refused.value.field == field


def test_a_platform_token_defaults_to_its_id() -> None:
    assert check_principal("shop", Role.PLATFORM, None) == "shop"
    assert check_principal("shop-web", Role.PLATFORM, "Shop Web") == "Shop Web"
    assert check_principal("alice", Role.REVIEWER, None) is None
