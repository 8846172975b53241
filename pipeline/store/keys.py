"""Every Redis key modpipe writes is built here, from a fixed namespace and encoded parts.

Why: ids come from callers (content ids from producers, reviewer and platform names, policy ids, model names).
Joined into keys as they are, an id containing the separator can name another key: a content id
``appeal:<victim>:1`` once took the ledger slot of another item's first appeal, and an item with id ``tokens``
wrote its review task into the review service's token hash (``review`` + ``:`` + ``tokens``). Here each
caller-supplied part is percent-encoded (everything outside ``A-Z a-z 0-9 . _ - ~``; ``:`` never survives), and the
namespaces are fixed strings of which none is a ``:``-prefix of another, so a key of one family can never equal a
key of another, whatever the ids. Ids made only of the safe characters encode to themselves, so such keys read
as before.

The review queue's Lua scripts build keys inside Redis from the prefix, a namespace and a part; they receive
parts already encoded with :func:`encode_part` (and hand members back encoded: :func:`decode_part`).
"""

from __future__ import annotations

import enum
from urllib.parse import quote, unquote


class Namespace(str, enum.Enum):
    LEDGER = "ledger"  # + effect kind + effect id parts: the effect ledger (outbox)
    VISIBILITY = "vis"  # + content id
    REVISIONS = "rev"  # + content id: the revisions (texts) seen for an item
    VERDICT_CACHE = "rcache"  # + cache key parts
    REVIEW_TASK = "review:task"  # + content id
    REVIEW_QUEUE = "review:q"  # + severity + policy id, or "admin"
    REVIEW_QUEUES = "review:queues"
    REVIEW_LEASES = "review:leases"
    REVIEW_EXCLUDED = "review:excl"  # + content id
    REVIEW_HISTORY = "review:hist"  # + content id
    REVIEW_LOG = "review:log"
    REVIEW_UNDONE = "review:undone"
    REVIEW_TOKENS = "review:tokens"
    REVIEW_SESSION = "review:session"  # + session hash
    REVIEW_RELAY_LOCK = "review:relay:lock"
    REVIEW_RELAY_CURSOR = "review:relay:cursor"
    RATE_LIMIT = "ratelimit"  # + limit name + client address: per-client token buckets (pipeline.http.ratelimit)
    ATTEMPTS = "attempts"  # + topic, partition, offset, digest: deliveries of one record (crash-loop protection)
    LAG = "lag"  # + role: the consumer group's lag and backlog flag, for `modpipe status` and a gateway
    GATEWAY_ITEM = "gateway:item"  # + content id: the text hash and platform the gateway last accepted for an item
    WEBHOOKS = "webhooks:reg"  # the registered webhook of each platform (hash: platform -> registration)
    WEBHOOK_DEAD = "webhooks:dead"  # + platform: deliveries dead-lettered after their attempts, oldest first
    WEBHOOK_PARKED = "webhooks:parked"  # + platform: content ids whose deliveries wait behind a dead letter
    POLICY_ENFORCING = "policy:enforcing"  # hash: policy id -> the enforcing version and the ones before it
    POLICY_SHADOW = "policy:shadow"  # hash: policy id + version -> a shadow registration (sample, who, when)
    POLICY_TEXT = "policy:text"  # + policy id + version: the text of a version workers may load
    POLICY_HISTORY = "policy:hist"  # + policy id: the lifecycle audit entries, oldest first
    POLICY_OUTBOX = "policy:outbox"  # hash: audit id -> a lifecycle audit entry not yet published
    POLICY_REPORTS = "policy:reports"  # + policy id + version: hash of report kind -> summary (golden, backtest ...)
    POLICY_WORKERS = "policy:workers"  # sorted set: worker id -> when it last said which versions it runs
    POLICY_LOADED = "policy:loaded"  # hash: worker id -> the versions that worker enforces and shadows


def encode_part(value: object) -> str:
    """A caller-supplied value as one key part: percent-encoded UTF-8, never containing ``:``."""
    return quote(str(value), safe="._-~")


def decode_part(part: str | bytes) -> str:
    """The value :func:`encode_part` encoded."""
    return unquote(part.decode() if isinstance(part, bytes) else part)


class Keyspace:
    """Builds keys under one prefix (``settings.redis.key_prefix``): ``<prefix><namespace>:<part>:<part>...``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def key(self, namespace: Namespace, *parts: object) -> str:
        return self.prefix + namespace.value + "".join(":" + encode_part(p) for p in parts)
