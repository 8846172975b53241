"""Who may use the review service: access tokens (stored hashed), roles and web-page sessions.

A token is 32 random bytes (``mpr_`` + urlsafe base64) shown once when created; Redis keeps only its SHA-256, so
a copy of the database cannot be replayed against the API (a token has 256 bits of entropy, so a fast hash is the
right tool, as for API keys; passwords would need a slow one). An optional bootstrap admin token comes from the
settings (``MODPIPE_REVIEW__ADMIN_TOKEN``) so a fresh deployment can create the first reviewers.

Roles: ``reviewer`` (claims, decides, skips, escalates), ``admin`` (all of that, the admin queue, exports,
tokens, appeals) and ``platform`` (the visibility API and appeals: what a platform integration needs).

The web page logs in by posting a token once; the service answers with an HttpOnly, SameSite=Strict cookie naming
a server-side session (its id also stored hashed), so the token never sits in the page's JavaScript.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from pipeline.store import RedisStore
from pipeline.store.keys import Namespace

TOKEN_PREFIX = "mpr_"


class Role(str, enum.Enum):
    REVIEWER = "reviewer"
    ADMIN = "admin"
    PLATFORM = "platform"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller; ``principal_id`` is what verdicts and the audit log attribute actions to."""

    principal_id: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def can_review(self) -> bool:
        return self.role in (Role.REVIEWER, Role.ADMIN)


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class TokenStore:
    """Tokens and sessions in Redis, under the store's prefix."""

    def __init__(self, store: RedisStore, bootstrap_admin_token: str | None = None) -> None:
        self.store = store
        self._bootstrap = token_hash(bootstrap_admin_token) if bootstrap_admin_token else None

    def _tokens_key(self) -> str:
        return self.store.key(Namespace.REVIEW_TOKENS)

    async def create(self, principal_id: str, role: Role) -> str:
        """Make a token for ``principal_id``; returns the token itself (shown once, never stored)."""
        if not principal_id or len(principal_id) > 64 or not principal_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError("principal id must be 1-64 letters, digits, '-', '_' or '.'")
        token = new_token()
        record = json.dumps({"id": principal_id, "role": role.value, "created_at": time.time()})
        await self.store.guard(self.store.redis.hset(self._tokens_key(), token_hash(token), record))
        return token

    async def revoke(self, principal_id: str) -> int:
        """Revoke every token of ``principal_id``; returns how many."""
        entries = await self.store.guard(self.store.redis.hgetall(self._tokens_key()))
        doomed = [h for h, raw in entries.items() if json.loads(raw)["id"] == principal_id]
        if doomed:
            await self.store.guard(self.store.redis.hdel(self._tokens_key(), *doomed))
        return len(doomed)

    async def list(self) -> list[dict[str, object]]:
        """Principals with tokens (never the tokens or their hashes)."""
        entries = await self.store.guard(self.store.redis.hgetall(self._tokens_key()))
        rows = [json.loads(raw) for raw in entries.values()]
        return sorted(rows, key=lambda r: (r["role"], r["id"]))

    async def authenticate(self, token: str | None) -> Principal | None:
        if not token:
            return None
        digest = token_hash(token)
        if self._bootstrap and hmac.compare_digest(digest, self._bootstrap):
            return Principal("admin", Role.ADMIN)
        raw = await self.store.guard(self.store.redis.hget(self._tokens_key(), digest))
        if raw is None:
            return None
        data = json.loads(raw)
        return Principal(data["id"], Role(data["role"]))

    # -- web sessions -------------------------------------------------------------------------------------------

    async def open_session(self, principal: Principal, ttl_s: int) -> str:
        session = secrets.token_urlsafe(32)
        record = json.dumps({"id": principal.principal_id, "role": principal.role.value})
        await self.store.guard(
            self.store.redis.set(self.store.key(Namespace.REVIEW_SESSION, token_hash(session)), record, ex=ttl_s)
        )
        return session

    async def session(self, session: str | None) -> Principal | None:
        if not session:
            return None
        raw = await self.store.guard(self.store.redis.get(self.store.key(Namespace.REVIEW_SESSION, token_hash(session))))
        if raw is None:
            return None
        data = json.loads(raw)
        return Principal(data["id"], Role(data["role"]))

    async def close_session(self, session: str) -> None:
        await self.store.guard(self.store.redis.delete(self.store.key(Namespace.REVIEW_SESSION, token_hash(session))))
