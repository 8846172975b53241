"""How a delivery is signed and how a receiver checks it.

Every POST carries ``X-Modpipe-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>``, the
scheme Stripe and others use: the timestamp is signed with the body, so a receiver that refuses signatures older
than a few minutes (``tolerance_s``) cannot be fed an old delivery again by someone who recorded it. Compare in
constant time. ``X-Modpipe-Delivery`` (the receiver's idempotency key), ``X-Modpipe-Event`` and
``X-Modpipe-Attempt`` go with it; the body is a :class:`~pipeline.schemas.WebhookDelivery`.
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "X-Modpipe-Signature"
DELIVERY_HEADER = "X-Modpipe-Delivery"
EVENT_HEADER = "X-Modpipe-Event"
ATTEMPT_HEADER = "X-Modpipe-Attempt"
DEFAULT_TOLERANCE_S = 300


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Modpipe-Signature`` value for ``body`` sent now (or at ``timestamp``)."""
    ts = int(time.time()) if timestamp is None else timestamp
    return f"t={ts},v1={_mac(secret, ts, body)}"


def verify(secret: str, header: str | None, body: bytes, *, tolerance_s: float = DEFAULT_TOLERANCE_S,
           now: float | None = None) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` within ``tolerance_s`` of ``now``."""
    if not header:
        return False
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        ts = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - ts) > tolerance_s:
        return False
    return hmac.compare_digest(parts.get("v1", ""), _mac(secret, ts, body))
