"""Who may use the review service: access tokens (stored hashed), roles and web-page sessions.

A token is 32 random bytes (``mpr_`` + urlsafe base64) shown once when created; Redis keeps only its SHA-256, so
a copy of the database cannot be replayed against the API (a token has 256 bits of entropy, so a fast hash is the
right tool, as for API keys; passwords would need a slow one). An optional bootstrap admin token comes from the
settings (``MODPIPE_REVIEW__ADMIN_TOKEN``) so a fresh deployment can create the first reviewers.

Roles: ``reviewer`` (claims, decides, skips, escalates, reads queues and stats), ``admin`` (all of that, the admin
queue, exports, tokens, appeals of any item) and ``platform`` (the visibility API and appeals, for its own
platform's items only: what a platform integration needs). A platform token names its platform (``platform``,
the principal id when not given), compared with ``Verdict.platform`` (copied from ``ContentItem.platform``).

The web page logs in by posting a token once; the service answers with an HttpOnly, SameSite=Strict cookie naming
a server-side session (its id also stored hashed), so the token never sits in the page's JavaScript. A session
holds only the hash of the token it was opened with and is valid only while that token is: revoking a principal's
tokens ends its sessions at their next request, and so does changing the bootstrap admin token. The principal and
role always come from the token's record.
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
MAX_PLATFORM_CHARS = 64  # ContentItem.platform's limit

# KEYS: the session, the token hash; ARGV: the bootstrap admin token's hash ('' for none). A session is worth what
# the token it was opened with is worth now: gone with it (and deleted then), and read through it.
_SESSION = """
local token = redis.call('GET', KEYS[1])
if not token then return false end
if ARGV[1] ~= '' and token == ARGV[1] then return {'bootstrap'} end
local record = redis.call('HGET', KEYS[2], token)
if not record then
  redis.call('DEL', KEYS[1])
  return false
end
return {'token', record}
"""


class Role(str, enum.Enum):
    REVIEWER = "reviewer"
    ADMIN = "admin"
    PLATFORM = "platform"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller; ``principal_id`` is what verdicts and the audit log attribute actions to."""

    principal_id: str
    role: Role
    platform: str | None = None  # the platform whose items a platform token may read and appeal

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN

    @property
    def can_review(self) -> bool:
        return self.role in (Role.REVIEWER, Role.ADMIN)

    def owns(self, platform: str | None) -> bool:
        """Whether a platform caller may see an item of ``platform``: only its own; an item of no platform is
        nobody's. Reviewers and admins are not scoped (this is for platform callers only)."""
        return self.role is Role.PLATFORM and platform is not None and platform == self.platform


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def principal_from_record(raw: bytes | str) -> Principal:
    """The principal a stored token record (JSON) names."""
    data = json.loads(raw)
    role = Role(data["role"])
    # Platform tokens made before tokens named their platform are scoped to the platform named like them.
    platform = (data.get("platform") or data["id"]) if role is Role.PLATFORM else None
    return Principal(data["id"], role, platform)


class InvalidPrincipal(ValueError):
    """A principal id or platform the token store refuses; ``field`` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_principal(principal_id: str, role: Role, platform: str | None) -> str | None:
    """Raise :class:`InvalidPrincipal` for an id or platform the store refuses; returns the platform the token
    will name (None for reviewers and admins)."""
    if not principal_id or len(principal_id) > 64 or not principal_id.replace("-", "").replace("_", "").replace(".", "").isalnum():
        raise InvalidPrincipal("principal_id", "principal id must be 1-64 letters, digits, '-', '_' or '.'")
    if role is not Role.PLATFORM:
        if platform is not None:
            raise InvalidPrincipal("platform", "only platform tokens name a platform")
        return None
    platform = principal_id if platform is None else platform
    if not platform or len(platform) > MAX_PLATFORM_CHARS or not platform.isprintable():
        raise InvalidPrincipal("platform", f"platform must be 1-{MAX_PLATFORM_CHARS} printable characters "
                               "(as ContentItem.platform)")
    return platform


class TokenStore:
    """Tokens and sessions in Redis, under the store's prefix."""

    def __init__(self, store: RedisStore, bootstrap_admin_token: str | None = None) -> None:
        self.store = store
        self._bootstrap = token_hash(bootstrap_admin_token) if bootstrap_admin_token else None
        self._session_script = store.redis.register_script(_SESSION)

    def _tokens_key(self) -> str:
        return self.store.key(Namespace.REVIEW_TOKENS)

    def _session_key(self, session: str) -> str:
        return self.store.key(Namespace.REVIEW_SESSION, token_hash(session))

    async def create(self, principal_id: str, role: Role, platform: str | None = None) -> str:
        """Make a token for ``principal_id`` (a platform token for ``platform``, default the principal id);
        returns the token itself (shown once, never stored)."""
        platform = check_principal(principal_id, role, platform)
        token = new_token()
        fields: dict[str, object] = {"id": principal_id, "role": role.value, "created_at": time.time()}
        if platform is not None:
            fields["platform"] = platform
        await self.store.guard(self.store.redis.hset(self._tokens_key(), token_hash(token), json.dumps(fields)))
        return token

    async def revoke(self, principal_id: str) -> int:
        """Revoke every token of ``principal_id``; returns how many. Sessions opened with them end too."""
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
        return None if raw is None else principal_from_record(raw)

    # -- web sessions -------------------------------------------------------------------------------------------

    async def open_session(self, token: str, ttl_s: int) -> str:
        """A new session for a token (authenticated by the caller just before); returns the session id."""
        session = secrets.token_urlsafe(32)
        await self.store.guard(self.store.redis.set(self._session_key(session), token_hash(token), ex=ttl_s))
        return session

    async def session(self, session: str | None) -> Principal | None:
        """The principal of a live session whose token still stands; None otherwise (and the session is gone)."""
        if not session or len(session) > 256:
            return None
        found = await self.store.guard(self._session_script(
            keys=[self._session_key(session), self._tokens_key()], args=[self._bootstrap or ""]))
        if not found:
            return None
        if found[0] in (b"bootstrap", "bootstrap"):
            return Principal("admin", Role.ADMIN)
        return principal_from_record(found[1])

    async def close_session(self, session: str) -> None:
        await self.store.guard(self.store.redis.delete(self._session_key(session)))
