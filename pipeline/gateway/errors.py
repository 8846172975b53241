"""The gateway's answers that are not a success; each carries its status, a one-line message and detail fields.

Shapes follow :mod:`pipeline.http.errors` (``{"error": "<one line>", ...detail}``): 422 adds ``fields`` (each
``{"field", "problem"}``, never the input), 409 ``reason`` and ``conflicts``, 429 and 503 ``retry_after_s`` and a
``Retry-After`` header.
"""

from __future__ import annotations

from typing import Any


class GatewayError(Exception):
    status = 500

    def __init__(self, message: str, headers: dict[str, str] | None = None, **detail: Any) -> None:
        super().__init__(message)
        self.headers = headers or {}
        self.detail = detail

    def body(self) -> dict[str, Any]:
        return {"error": str(self), **self.detail}


class Invalid(GatewayError):
    status = 422

    def __init__(self, fields: list[dict[str, str]]) -> None:
        shown = "; ".join(f"{f['field']}: {f['problem']}" for f in fields[:3])
        more = f" (and {len(fields) - 3} more)" if len(fields) > 3 else ""
        super().__init__(f"invalid request: {shown}{more}", fields=fields)


class Unauthorized(GatewayError):
    status = 401

    def __init__(self) -> None:
        super().__init__("authentication required", headers={"WWW-Authenticate": 'Bearer realm="modpipe-gateway"'})


class Forbidden(GatewayError):
    status = 403


class NotFound(GatewayError):
    status = 404


class Conflict(GatewayError):
    status = 409


class TooManyRequests(GatewayError):
    status = 429

    def __init__(self, message: str, retry_after_s: float, **detail: Any) -> None:
        wait = max(1, int(-(-retry_after_s // 1)))
        super().__init__(message, headers={"Retry-After": str(wait)}, retry_after_s=round(retry_after_s, 1), **detail)


class Unavailable(GatewayError):
    status = 503

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message, headers={"Retry-After": str(retry_after_s)}, retry_after_s=retry_after_s)
