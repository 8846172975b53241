"""What the gateway accepted: one record per content id, so the same item twice is one item and an edit is explicit.

Why a record of its own: the pipeline learns an item's text only when a triage worker reads it (the revisions hash,
:mod:`pipeline.store`), so two requests a moment apart would otherwise both look new. The gateway keeps, per
content id, ``<prefix>gateway:item:<id>`` = {platform, hash (the normalised text's sha256, as revisions use),
state pending|published, prev_hash, prev_state}; an id published over Kafka (no gateway record) is judged by the
pipeline's revisions hash and the platform of its latest verdict.

Outcomes per item, decided for a whole request in one Redis script (all or nothing):

* ``accepted``: a new id; ``edit``: a known id of the caller with another text and ``edit: true``;
* ``duplicate``: the same text as the id's latest (published again only if the earlier publish was never
  acknowledged, :attr:`Outcome.RESEND`: harmless, the pipeline treats the same text as a redelivery);
* refusals, which write nothing for any item of the request: ``edit_without_flag`` (another text without
  ``edit``) and ``id_taken`` (the id belongs to another platform, or to none: an item published over Kafka without
  a platform is nobody's).

A publish the broker did not acknowledge rolls the request's new records back, so a retry is not refused as an
edit of a text that never reached the pipeline.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Protocol

from pipeline.config import Settings
from pipeline.schemas import ContentItem
from pipeline.store.keys import Namespace
from pipeline.store.redis import RedisStore
from pipeline.texts import text_hash


class Outcome(str, enum.Enum):
    ACCEPTED = "accepted"
    EDIT = "edit"
    DUPLICATE = "duplicate"
    RESEND = "resend"  # a duplicate whose earlier publish was not acknowledged (yet): publish again
    EDIT_WITHOUT_FLAG = "edit_without_flag"
    ID_TAKEN = "id_taken"

    @property
    def refused(self) -> bool:
        return self in (Outcome.EDIT_WITHOUT_FLAG, Outcome.ID_TAKEN)

    @property
    def publishes(self) -> bool:
        return self in (Outcome.ACCEPTED, Outcome.EDIT, Outcome.RESEND)

    @property
    def shown(self) -> str:
        """The status a caller sees (a resend is a duplicate to them)."""
        return Outcome.DUPLICATE.value if self is Outcome.RESEND else self.value


@dataclass(frozen=True)
class Submission:
    """One item of a request, ready to publish (``platform`` already the caller's)."""

    index: int
    item: ContentItem
    edit: bool

    @property
    def text_hash(self) -> str:
        return text_hash(self.item.text)


class Sink(Protocol):
    """The acknowledged publisher (:class:`pipeline.broker.Publisher`)."""

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None: ...


# KEYS: per item, its gateway record, revisions hash and visibility hash. ARGV: platform, now, ttl, then per item
# its text hash and edit flag ('1' / '0'). Returns one outcome per item; writes nothing if any item is refused.
_CLAIM = """
local n = #KEYS / 3
local platform, now, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local kinds, adopt = {}, {}
for i = 1, n do
  local gw, rev, vis = KEYS[3 * i - 2], KEYS[3 * i - 1], KEYS[3 * i]
  local hash, edit = ARGV[2 + 2 * i], ARGV[3 + 2 * i]
  local owner, known, state = unpack(redis.call('HMGET', gw, 'platform', 'hash', 'state'))
  local kind
  if owner then
    if owner ~= platform then kind = 'id_taken'
    elseif known == hash then kind = (state == 'published') and 'duplicate' or 'resend'
    elseif edit == '1' then kind = 'edit'
    else kind = 'edit_without_flag' end
  else
    local latest = redis.call('HGET', rev, 'latest_hash')
    if not latest then
      kind = 'accepted'
    else
      -- Published over Kafka: whose it is says its latest verdict (no platform: nobody's).
      local verdict, owner_of = redis.call('HGET', vis, 'verdict'), nil
      if verdict then
        local ok, decoded = pcall(cjson.decode, verdict)
        if ok and type(decoded) == 'table' and type(decoded['platform']) == 'string' then
          owner_of = decoded['platform']
        end
      end
      if owner_of ~= platform then kind = 'id_taken'
      elseif latest == hash then kind = 'duplicate'; adopt[i] = true
      elseif edit == '1' then kind = 'edit'
      else kind = 'edit_without_flag' end
    end
  end
  kinds[i] = kind
end
for i = 1, n do
  if kinds[i] == 'id_taken' or kinds[i] == 'edit_without_flag' then return kinds end
end
for i = 1, n do
  local gw, hash = KEYS[3 * i - 2], ARGV[2 + 2 * i]
  if kinds[i] == 'accepted' or kinds[i] == 'edit' then
    local prev, prev_state = unpack(redis.call('HMGET', gw, 'hash', 'state'))
    redis.call('HSET', gw, 'platform', platform, 'hash', hash, 'state', 'pending', 'prev_hash', prev or '',
               'prev_state', prev_state or '', 'at', now)
    redis.call('EXPIRE', gw, ttl)
  elseif adopt[i] then
    redis.call('HSET', gw, 'platform', platform, 'hash', hash, 'state', 'published', 'prev_hash', '',
               'prev_state', '', 'at', now)
    redis.call('EXPIRE', gw, ttl)
  end
end
return kinds
"""

# KEYS: gateway records; ARGV: their text hashes. The broker acknowledged: published (unless edited since).
_MARK = """
for i = 1, #KEYS do
  if redis.call('HGET', KEYS[i], 'hash') == ARGV[i] then redis.call('HSET', KEYS[i], 'state', 'published') end
end
return 1
"""

# KEYS: gateway records; ARGV: their text hashes. The broker did not acknowledge: undo what the claim wrote.
_ROLLBACK = """
for i = 1, #KEYS do
  local hash, state, prev, prev_state = unpack(redis.call('HMGET', KEYS[i], 'hash', 'state', 'prev_hash', 'prev_state'))
  if hash == ARGV[i] and state == 'pending' then
    if prev and prev ~= '' then
      redis.call('HSET', KEYS[i], 'hash', prev, 'state', prev_state or 'published', 'prev_hash', '', 'prev_state', '')
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 1
"""


@dataclass(frozen=True)
class Record:
    """The gateway's record of an item (None fields: no record)."""

    platform: str | None
    text_hash: str | None
    published: bool


class Intake:
    """Claims, publishes and rolls back submissions (see the module docstring)."""

    def __init__(self, settings: Settings, store: RedisStore, sink: Sink | None) -> None:
        self.store = store
        self.sink = sink
        self.topic = settings.kafka.topic(settings.kafka.incoming_topic)
        self.ttl_s = settings.redis.verdict_ttl_s
        self._claim = store.redis.register_script(_CLAIM)
        self._mark = store.redis.register_script(_MARK)
        self._rollback = store.redis.register_script(_ROLLBACK)

    def _record_key(self, content_id: str) -> str:
        return self.store.key(Namespace.GATEWAY_ITEM, content_id)

    async def claim(self, platform: str, submissions: list[Submission]) -> list[Outcome]:
        """Decide every submission's outcome at once; records are written only if none is refused."""
        keys: list[str] = []
        args: list[str | int] = [platform, f"{time.time():.6f}", self.ttl_s]
        for sub in submissions:
            cid = sub.item.content_id
            keys += [self._record_key(cid), self.store.key(Namespace.REVISIONS, cid),
                     self.store.key(Namespace.VISIBILITY, cid)]
            args += [sub.text_hash, "1" if sub.edit else "0"]
        kinds = await self.store.guard(self._claim(keys=keys, args=args))
        return [Outcome(k.decode() if isinstance(k, bytes) else k) for k in kinds]

    async def publish(self, submissions: list[Submission]) -> None:
        """Publish and wait for the broker's acknowledgement (acks=all); raises BrokerUnavailable."""
        if self.sink is None:
            raise RuntimeError("the gateway was not started (no publisher)")
        await self.sink.send_many([(self.topic, s.item.content_id, s.item.to_bytes()) for s in submissions])

    async def mark_published(self, submissions: list[Submission]) -> None:
        if submissions:
            await self.store.guard(self._mark(keys=[self._record_key(s.item.content_id) for s in submissions],
                                              args=[s.text_hash for s in submissions]))

    async def rollback(self, submissions: list[Submission]) -> None:
        if submissions:
            await self.store.guard(self._rollback(keys=[self._record_key(s.item.content_id) for s in submissions],
                                                  args=[s.text_hash for s in submissions]))

    async def record(self, content_id: str) -> Record:
        platform, hashed, state = await self.store.guard(
            self.store.redis.hmget(self._record_key(content_id), "platform", "hash", "state"))
        if platform is None:
            return Record(None, None, False)
        return Record(platform.decode(), hashed.decode() if hashed else None, state in (b"published", "published"))
