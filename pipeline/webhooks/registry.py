"""Webhook registrations, their secrets, and what could not be delivered, in Redis.

Registrations: one callback URL per platform, in the hash ``<prefix>webhooks:reg`` (platform -> {url,
registration_id, created_at}). Registering is an operator action (``modpipe webhooks add PLATFORM URL``), not an
API: a platform cannot point modpipe's deliverer at an address of its choosing (no SSRF through registration).
A webhook receives the verdicts *decided after* it was registered; older ones are not sent. Running deliverers
re-read registrations every few seconds (:data:`pipeline.webhooks.deliverer.HOOKS_REFRESH_S`), so a new, changed or
removed registration takes effect that much later.

Secrets are never stored: each is HMAC-SHA256(``webhooks.signing_key``, platform and registration id), shown once
by ``webhooks add`` and derived again by the deliverer, so a copy of Redis signs nothing. Registering again makes
a new registration id, hence a new secret (rotation); changing the signing key rotates every platform's secret.

Dead letters: a delivery that failed all its attempts goes to ``<prefix>webhooks:dead:<platform>`` (a list,
oldest first) and its content id is *parked* (``<prefix>webhooks:parked:<platform>``: content id -> how many of
its deliveries are dead): later deliveries for a parked id join the list instead of being sent, so a receiver
never gets a newer verdict before an older one. ``modpipe webhooks replay`` sends the list in order; an id is
unparked when its last dead delivery went through. Both keys live ``redis.verdict_ttl_s`` after their last write.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from pipeline.errors import PermanentError
from pipeline.review.auth import MAX_PLATFORM_CHARS
from pipeline.schemas import WebhookDelivery
from pipeline.store.keys import Namespace
from pipeline.store.redis import RedisStore

SECRET_PREFIX = "whsec_"
MAX_URL_CHARS = 2048

# KEYS: dead list, parked hash; ARGV: entry, content id, ttl. Append a dead letter and park its content id.
_DEAD = """
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# Same keys and arguments: queue the delivery behind its content id's dead letters, if it has any (1), else 0.
_PARK_IF_PARKED = """
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 0 then return 0 end
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('HINCRBY', KEYS[2], ARGV[2], 1)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
return 1
"""

# KEYS: dead list, parked hash; ARGV: the entry replay delivered, its content id. Remove it if it is still the head.
_DELIVERED_HEAD = """
if redis.call('LINDEX', KEYS[1], 0) ~= ARGV[1] then return 0 end
redis.call('LPOP', KEYS[1])
if redis.call('HINCRBY', KEYS[2], ARGV[2], -1) <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end
return 1
"""


class SigningKeyMissing(PermanentError):
    """``webhooks.signing_key`` is not set: no secret can be derived."""


class InvalidWebhook(ValueError):
    """A platform or URL the registry refuses; ``field`` names which."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_url(url: str) -> str:
    if len(url) > MAX_URL_CHARS:
        raise InvalidWebhook("url", f"at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidWebhook("url", "must be an http:// or https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise InvalidWebhook("url", "must not carry credentials (the signature authenticates deliveries)")
    return url


def check_platform(platform: str) -> str:
    if not platform or len(platform) > MAX_PLATFORM_CHARS or not platform.isprintable():
        raise InvalidWebhook("platform", f"1-{MAX_PLATFORM_CHARS} printable characters (as ContentItem.platform)")
    return platform


def derive_secret(signing_key: str, platform: str, registration_id: str) -> str:
    """The signing secret of one registration (see the module docstring)."""
    mac = hmac.new(signing_key.encode("utf-8"), f"modpipe-webhook-v1\x00{platform}\x00{registration_id}".encode(),
                   hashlib.sha256).digest()
    return SECRET_PREFIX + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def delivery_id(platform: str, verdict_id: str) -> str:
    """The same for every attempt, redelivery and replay of one verdict to one platform."""
    return "dlv_" + hashlib.sha256(f"{platform}\x00{verdict_id}".encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Webhook:
    platform: str
    url: str
    registration_id: str
    created_at: float  # epoch seconds: verdicts decided before are not delivered

    def secret(self, signing_key: str) -> str:
        return derive_secret(signing_key, self.platform, self.registration_id)

    def to_json(self) -> str:
        return json.dumps({"url": self.url, "registration_id": self.registration_id, "created_at": self.created_at})

    @classmethod
    def from_json(cls, platform: str, raw: bytes | str) -> Webhook:
        data = json.loads(raw)
        return cls(platform, data["url"], data["registration_id"], float(data["created_at"]))


@dataclass(frozen=True)
class DeadLetter:
    """A delivery that did not get through (``reason``: attempts, suspended) or waits behind one (parked)."""

    delivery: WebhookDelivery
    reason: str
    attempts: int
    error: str
    dead_at: float

    def to_json(self) -> str:
        return json.dumps({"delivery": json.loads(self.delivery.model_dump_json()), "reason": self.reason,
                           "attempts": self.attempts, "error": self.error, "dead_at": self.dead_at})

    @classmethod
    def from_json(cls, raw: bytes | str) -> DeadLetter:
        data = json.loads(raw)
        return cls(WebhookDelivery.model_validate(data["delivery"]), data["reason"], int(data["attempts"]),
                   data["error"], float(data["dead_at"]))


class WebhookRegistry:
    """Registrations, dead letters and parked content ids (every call may raise StoreUnavailable)."""

    def __init__(self, store: RedisStore, ttl_s: int) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self._dead = store.redis.register_script(_DEAD)
        self._park_if_parked = store.redis.register_script(_PARK_IF_PARKED)
        self._delivered_head = store.redis.register_script(_DELIVERED_HEAD)

    def _reg_key(self) -> str:
        return self.store.key(Namespace.WEBHOOKS)

    def _dead_keys(self, platform: str) -> list[str]:
        return [self.store.key(Namespace.WEBHOOK_DEAD, platform), self.store.key(Namespace.WEBHOOK_PARKED, platform)]

    # -- registrations --------------------------------------------------------------------------------------------

    async def add(self, platform: str, url: str, *, now: float | None = None) -> Webhook:
        """Register (or replace, with a new secret) the callback URL of ``platform``."""
        hook = Webhook(check_platform(platform), check_url(url), secrets.token_hex(8),
                       time.time() if now is None else now)
        await self.store.guard(self.store.redis.hset(self._reg_key(), platform, hook.to_json()))
        return hook

    async def remove(self, platform: str) -> bool:
        return bool(await self.store.guard(self.store.redis.hdel(self._reg_key(), platform)))

    async def get(self, platform: str) -> Webhook | None:
        raw = await self.store.guard(self.store.redis.hget(self._reg_key(), platform))
        return None if raw is None else Webhook.from_json(platform, raw)

    async def all(self) -> dict[str, Webhook]:
        entries = await self.store.guard(self.store.redis.hgetall(self._reg_key()))
        hooks = (Webhook.from_json(k.decode() if isinstance(k, bytes) else k, v) for k, v in entries.items())
        return {h.platform: h for h in hooks}

    # -- dead letters ---------------------------------------------------------------------------------------------

    async def dead_letter(self, letter: DeadLetter) -> None:
        d = letter.delivery
        await self.store.guard(self._dead(keys=self._dead_keys(d.platform),
                                          args=[letter.to_json(), d.content_id, self.ttl_s]))

    async def park_if_parked(self, letter: DeadLetter) -> bool:
        """Queue ``letter`` behind its content id's dead letters if it has any; True if it did."""
        d = letter.delivery
        return bool(await self.store.guard(self._park_if_parked(
            keys=self._dead_keys(d.platform), args=[letter.to_json(), d.content_id, self.ttl_s])))

    async def head(self, platform: str) -> tuple[str, DeadLetter] | None:
        raw = await self.store.guard(self.store.redis.lindex(self._dead_keys(platform)[0], 0))
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        return text, DeadLetter.from_json(text)

    async def delivered_head(self, platform: str, raw: str, content_id: str) -> bool:
        return bool(await self.store.guard(self._delivered_head(keys=self._dead_keys(platform),
                                                                args=[raw, content_id])))

    async def dead_letters(self, platform: str, limit: int = 100) -> list[DeadLetter]:
        raw = await self.store.guard(self.store.redis.lrange(self._dead_keys(platform)[0], 0, max(0, limit - 1)))
        return [DeadLetter.from_json(r) for r in raw]

    async def counts(self, platform: str) -> dict[str, Any]:
        dead, parked = self._dead_keys(platform)
        n_dead, n_parked = await asyncio.gather(self.store.guard(self.store.redis.llen(dead)),
                                                self.store.guard(self.store.redis.hlen(parked)))
        return {"dead_letters": int(n_dead), "parked_ids": int(n_parked)}
