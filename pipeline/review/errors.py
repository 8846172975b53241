"""What the review service refuses, each with the HTTP status its API answers with.

    ReviewError      400  a request the service refuses
    ├── NotFound     404  no such review task, item or verdict
    ├── Conflict     409  the item is not held by the caller, already decided, or busy
    ├── Forbidden    403  the caller's role may not do this
    └── Invalid      422  a decision or appeal that breaks a rule (unknown rule id, SAFE rule cited for removal)
"""

from __future__ import annotations

from typing import Any


class ReviewError(Exception):
    """A request the service refuses; ``status`` is the HTTP status the API answers with."""

    status = 400

    def __init__(self, message: str, **detail: Any) -> None:
        super().__init__(message)
        self.detail = detail


class NotFound(ReviewError):
    status = 404


class Conflict(ReviewError):
    status = 409


class Forbidden(ReviewError):
    status = 403


class Invalid(ReviewError):
    status = 422
