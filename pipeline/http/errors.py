"""Error answers of modpipe's HTTP services: they say what is wrong and where, and never repeat what was sent.

FastAPI's default 422 lists every error with its ``input`` (a 100 MB token came back whole); pydantic's messages
for some error types quote the input too. :func:`field_errors` rebuilds each error from its location and type
only: ``{"field": "body.item.text", "problem": "String should have at most 256 characters"}``. A location part that
the caller chose (the name of an unexpected field) is shown as ``<key>``; messages are kept only for error types
whose text comes from the schema (limits, patterns, allowed values), others say ``invalid value (<type>)``.

Answer shapes (every service, every status): ``{"error": "<one line>", ...detail}``. 422 adds ``fields``, 413
``limit_bytes``, 429 ``retry_after_s`` and a ``Retry-After`` header.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from pydantic import ValidationError

from pipeline import metrics

logger = logging.getLogger(__name__)

MAX_FIELD_ERRORS = 10
_MAX_PART_CHARS = 64
_MAX_PROBLEM_CHARS = 200
# Error types whose pydantic message is made from the schema alone (bounds, patterns, allowed values, counts).
_SCHEMA_MESSAGES = frozenset({
    "missing", "extra_forbidden", "model_type", "model_attributes_type", "dict_type", "list_type", "tuple_type",
    "set_type", "none_required", "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
    "finite_number", "too_short", "too_long", "string_type", "string_unicode", "string_too_short",
    "string_too_long", "string_pattern_mismatch", "enum", "literal_error", "bool_type", "bool_parsing", "int_type",
    "int_parsing", "int_parsing_size", "int_from_float", "float_type", "float_parsing", "json_type",
    "datetime_type", "datetime_parsing", "datetime_from_date_parsing", "timezone_naive", "timezone_aware",
    "date_type", "date_parsing",
})


def _part(part: Any) -> str:
    if isinstance(part, int):
        return str(part)
    text = str(part)
    return text if len(text) <= _MAX_PART_CHARS else text[:_MAX_PART_CHARS] + "..."


def _problem(error: dict[str, Any]) -> str:
    kind = str(error.get("type", "invalid"))
    if kind == "json_invalid":
        reason = (error.get("ctx") or {}).get("error")  # the JSON parser's fixed phrase, e.g. "Expecting value"
        return f"invalid JSON ({reason})" if isinstance(reason, str) and len(reason) < 80 else "invalid JSON"
    if kind == "extra_forbidden":
        return "unexpected field"
    if kind in _SCHEMA_MESSAGES:
        message = str(error.get("msg", kind))
        return message if len(message) <= _MAX_PROBLEM_CHARS else message[:_MAX_PROBLEM_CHARS] + "..."
    return f"invalid value ({kind})"


def field_errors(errors: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """``[{"field", "problem"}]`` for pydantic / FastAPI error dicts, at most :data:`MAX_FIELD_ERRORS`, no input."""
    out = []
    for error in list(errors)[:MAX_FIELD_ERRORS]:
        loc = list(error.get("loc", ()))
        if error.get("type") == "extra_forbidden" and loc:
            loc[-1] = "<key>"  # the unexpected field's name is the caller's input
        if error.get("type") == "json_invalid":
            loc = [p for p in loc if not isinstance(p, int)]  # FastAPI puts the parser's offset there
        out.append({"field": ".".join(_part(p) for p in loc) or "body", "problem": _problem(error)})
    return out


def invalid_body(errors: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The 422 body for a list of validation errors."""
    fields = field_errors(errors)
    shown = "; ".join(f"{f['field']}: {f['problem']}" for f in fields[:3])
    more = len(errors) - min(3, len(fields))
    return {"error": f"invalid request: {shown}" + (f" (and {more} more)" if more > 0 else ""), "fields": fields}


def field_error(field: str, problem: str) -> dict[str, Any]:
    """The 422 body for one field a handler found wrong (same shape as a validation error)."""
    return {"error": f"invalid request: {field}: {problem}", "fields": [{"field": field, "problem": problem}]}


def too_many_requests(limit: str, retry_after_s: float) -> tuple[dict[str, Any], dict[str, str]]:
    """The 429 body and headers for a client over ``limit``."""
    wait = max(1, math.ceil(retry_after_s))
    return ({"error": f"too many requests ({limit}); retry later", "retry_after_s": round(retry_after_s, 1)},
            {"Retry-After": str(wait)})


async def send_json(send: Callable[[dict[str, Any]], Awaitable[None]], status: int, body: dict[str, Any], *,
                    close: bool = False, headers: dict[str, str] | None = None) -> None:
    """Answer straight from ASGI middleware (no framework under it yet)."""
    payload = json.dumps(body, separators=(",", ":")).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


def install_error_handlers(app: Any, service: str) -> None:
    """Make a FastAPI app answer validation errors without echoing input (422), and turn a validation error raised
    inside a handler (a bug) into a plain 500 whose log line names the fields but not their values."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        metrics.http_refused_total.labels(service, "invalid_request").inc()
        return JSONResponse(invalid_body(exc.errors()), status_code=422)

    @app.exception_handler(ValidationError)
    async def _invalid_internal(request: Request, exc: ValidationError) -> JSONResponse:
        fields = field_errors(exc.errors(include_input=False, include_url=False))  # type: ignore[arg-type]
        logger.error("%s: %s %s built an invalid %s: %s", service, request.method, request.url.path, exc.title,
                     "; ".join(f"{f['field']}: {f['problem']}" for f in fields))
        return JSONResponse({"error": "internal error"}, status_code=500)
