"""pipeline.http: the body limit, error answers that never echo input, on plain ASGI and on a small FastAPI app.

These are the pieces the review service and the gateway share; test_review_limits.py holds the review service to
them, test_review_abuse_bench.py does it over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from pipeline.http.errors import field_errors, install_error_handlers, invalid_body, too_many_requests
from pipeline.http.limits import BodyLimit, client_address, content_body_bytes
from pipeline.schemas import AppealRequest, ContentItem

pytestmark = pytest.mark.unit

SENTINEL = "SENTINEL-INPUT-4a7e"


class Recorder:
    """An ASGI app that records the body it was given and answers 200."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.after: list[dict[str, Any]] = []

    async def __call__(self, scope, receive, send) -> None:  # type: ignore[no-untyped-def]
        message = await receive()
        self.calls.append(message["body"])
        assert message["more_body"] is False
        self.after.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def scope(path: str = "/v1/login", length: int | str | None = None) -> dict[str, Any]:
    headers = [] if length is None else [(b"content-length", str(length).encode())]
    return {"type": "http", "method": "POST", "path": path, "headers": headers, "client": ("10.1.2.3", 5555)}


def feeder(chunks: list[bytes] | None = None, endless: int = 0):  # type: ignore[no-untyped-def]
    """A receive() that yields ``chunks`` (or ``endless``-byte chunks forever) and counts what it handed out."""
    state = {"read": 0, "calls": 0}

    async def receive() -> dict[str, Any]:
        state["calls"] += 1
        if endless:
            state["read"] += endless
            return {"type": "http.request", "body": b"x" * endless, "more_body": True}
        if chunks:
            body = chunks.pop(0)
            state["read"] += len(body)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    return receive, state


def run(app, scope_: dict[str, Any], receive) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope_, receive, send))
    return sent


def answer(sent: list[dict[str, Any]]) -> tuple[int, dict[bytes, bytes], dict[str, Any]]:
    start, body = sent
    return start["status"], dict(start["headers"]), json.loads(body["body"])


def test_a_body_within_the_limit_reaches_the_app_whole_and_once() -> None:
    inner = Recorder()
    receive, _ = feeder([b'{"token": ', b'"abc"', b"}"])
    sent = run(BodyLimit(inner, max_bytes=64), scope(), receive)
    assert inner.calls == [b'{"token": "abc"}'] and sent[0]["status"] == 200
    assert inner.after == [{"type": "http.disconnect"}]  # after the body, what the server says next


def test_a_declared_body_over_the_limit_is_refused_before_a_byte_is_read() -> None:
    inner = Recorder()
    receive, state = feeder(endless=65536)
    sent = run(BodyLimit(inner, max_bytes=1024), scope(length=100 * 1024 * 1024), receive)
    status, headers, body = answer(sent)
    assert (status, body) == (413, {"error": "request body too large", "limit_bytes": 1024})
    assert state["calls"] == 0 and inner.calls == []
    # The connection stays open: the server drops the rest of the body, so the client reads the 413, not a reset.
    assert b"connection" not in headers


def test_an_undeclared_body_is_cut_off_once_it_passes_the_limit() -> None:
    inner = Recorder()
    receive, state = feeder(endless=4096)
    sent = run(BodyLimit(inner, max_bytes=16384), scope(), receive)
    status, _, _ = answer(sent)
    assert status == 413 and inner.calls == []
    assert state["read"] <= 16384 + 4096  # read up to the first chunk past the limit, never the 100 MB


def test_limits_are_per_route() -> None:
    inner = Recorder()
    limit = BodyLimit(inner, max_bytes=100, routes={"/v1/appeals": 5000})
    receive, _ = feeder([b"y" * 4000])
    assert run(limit, scope("/v1/appeals", 4000), receive)[0]["status"] == 200
    receive, _ = feeder([b"y" * 4000])
    assert run(limit, scope("/v1/login", 4000), receive)[0]["status"] == 413


def test_a_broken_content_length_is_a_400_and_other_scopes_pass() -> None:
    inner = Recorder()
    receive, _ = feeder([b"{}"])
    status, _, body = answer(run(BodyLimit(inner, max_bytes=100), scope(length="12, 13"), receive))
    assert status == 400 and inner.calls == []
    seen = []

    async def lifespan_app(scope_, receive_, send_) -> None:  # type: ignore[no-untyped-def]
        seen.append(scope_["type"])

    run(BodyLimit(lifespan_app, max_bytes=1), {"type": "lifespan"}, feeder()[0])
    assert seen == ["lifespan"]


def test_a_client_that_leaves_mid_body_reaches_nothing() -> None:
    inner = Recorder()
    state = {"n": 0}

    async def receive() -> dict[str, Any]:
        state["n"] += 1
        return {"type": "http.request", "body": b"ab", "more_body": True} if state["n"] == 1 else {"type": "http.disconnect"}

    assert run(BodyLimit(inner, max_bytes=100), scope(), receive) == [] and inner.calls == []


def test_the_longest_appeal_fits_its_route_limit_however_json_escapes_it() -> None:
    max_chars, base = 20_000, 16_384
    worst = "\x01"  # a control character: JSON's longest escape (\u0001), 6 bytes for 1 character
    item = ContentItem(content_id="a" * 128, text=worst * max_chars, author_id=worst * 128, platform=worst * 64,
                       language=worst * 16)
    body = AppealRequest(content_id="a" * 128, reason=worst * 2000, item=item).model_dump_json().encode()
    assert len(json.dumps(json.loads(body)).encode()) <= content_body_bytes(base, max_chars)


def test_field_errors_name_the_place_and_never_the_input() -> None:
    errors = [
        {"type": "string_too_long", "loc": ("body", "token"), "msg": "String should have at most 256 characters",
         "input": SENTINEL * 100, "ctx": {"max_length": 256}},
        {"type": "extra_forbidden", "loc": ("body", SENTINEL), "msg": "Extra inputs are not permitted", "input": SENTINEL},
        {"type": "union_tag_invalid", "loc": ("body", "x"), "msg": f"Input tag '{SENTINEL}' found using 'kind'",
         "input": {}, "ctx": {"tag": SENTINEL}},
        {"type": "value_error", "loc": ("body", "y"), "msg": f"Value error, bad {SENTINEL}", "input": SENTINEL},
        {"type": "json_invalid", "loc": ("body", 17), "msg": "JSON decode error", "input": {},
         "ctx": {"error": "Expecting value"}},
        {"type": "missing", "loc": ("body", "k" * 500), "msg": "Field required", "input": {}},
    ]
    fields = field_errors(errors)
    assert SENTINEL not in json.dumps(fields)
    assert fields[0] == {"field": "body.token", "problem": "String should have at most 256 characters"}
    assert fields[1] == {"field": "body.<key>", "problem": "unexpected field"}
    assert fields[2]["problem"] == "invalid value (union_tag_invalid)"
    assert fields[4] == {"field": "body", "problem": "invalid JSON (Expecting value)"}
    assert len(fields[5]["field"]) < 80
    many = invalid_body([errors[0]] * 50)
    assert len(many["fields"]) == 10 and "(and 47 more)" in many["error"]


def test_too_many_requests_says_when_to_come_back() -> None:
    body, headers = too_many_requests("login", 0.2)
    assert headers == {"Retry-After": "1"} and body["retry_after_s"] == 0.2 and "login" in body["error"]
    assert too_many_requests("login", 5.01)[1] == {"Retry-After": "6"}


def test_client_address_is_the_peer_or_unknown() -> None:
    assert client_address(scope()) == "10.1.2.3"
    assert client_address({"type": "http"}) == "unknown"


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(..., max_length=8)


def small_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(BodyLimit, max_bytes=16384, service="test")
    install_error_handlers(app, "test")

    @app.post("/echo")
    async def echo(body: Body) -> dict[str, str]:
        return {"token": body.token}

    @app.post("/bug")
    async def bug() -> dict[str, str]:
        Body(token=SENTINEL)  # a handler building an invalid model: a bug, whose input must not be logged
        return {}

    return app


def test_fastapi_validation_errors_come_back_without_the_input(caplog) -> None:  # type: ignore[no-untyped-def]
    async def scenario() -> None:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=small_app()), base_url="http://t") as http:
            long = await http.post("/echo", json={"token": SENTINEL})
            assert long.status_code == 422 and SENTINEL not in long.text
            assert long.json()["fields"] == [{"field": "body.token", "problem": "String should have at most 8 characters"}]
            deep = await http.post("/echo", content=b"[" * 16000, headers={"content-type": "application/json"})
            assert deep.status_code in (400, 422)  # never a crash: nesting that deep fails to parse
            bug = await http.post("/bug")
            assert bug.status_code == 500 and bug.json() == {"error": "internal error"}
            assert (await http.post("/echo", json={"token": "ok"})).json() == {"token": "ok"}

    with caplog.at_level(logging.DEBUG):
        asyncio.run(scenario())
    assert SENTINEL not in caplog.text
    assert "built an invalid Body: token: String should have at most 8 characters" in caplog.text
