"""The decision about an item's current text, read from the visibility store, and waiting for it with a deadline.

Which verdict is about *this* text: the pipeline's revisions hash (``rev:<id>``, written by the triage worker)
names the latest revision and its text hash. Once that hash is the one the gateway accepted, the visibility
record of that revision (or a later one) is the answer; before, the text is ``received`` and the decision is
hidden_pending (nothing is shown that the pipeline has not judged in its current form).

Waiting polls Redis, starting at 10 ms and doubling up to ``gateway.poll_interval_ms``, and never sleeps past the
deadline: every replica answers its own requests, whichever worker decides, with no subscription to lose.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from pipeline.gateway.models import ItemState
from pipeline.schemas import Decision, Verdict, VerdictStatus
from pipeline.store.base import Visibility, VisibilityRecord
from pipeline.store.keys import Namespace
from pipeline.store.redis import RedisStore

FIRST_POLL_S = 0.01


@dataclass(frozen=True)
class Current:
    """The decision about one text of an item, as far as the pipeline has got."""

    content_id: str
    judged_revision: int | None  # the revision holding this text, once a triage worker has read it
    record: VisibilityRecord

    @property
    def verdict(self) -> Verdict | None:
        """The latest verdict, if it is about this text (its revision or a later one)."""
        verdict = self.record.verdict
        if verdict is None or self.judged_revision is None or verdict.revision < self.judged_revision:
            return None
        return verdict

    @property
    def final(self) -> bool:
        verdict = self.verdict
        return verdict is not None and verdict.status is VerdictStatus.FINAL

    def state(self) -> ItemState:
        verdict = self.verdict
        if verdict is None:
            return ItemState(content_id=self.content_id, decision="hidden_pending", state="received", final=False)
        if verdict.status is VerdictStatus.PROVISIONAL or self.record.state is Visibility.HIDDEN_PENDING:
            return ItemState(content_id=self.content_id, decision="hidden_pending", state="hidden_pending",
                             final=False, revision=verdict.revision, verdict=verdict)
        allowed = verdict.decision is Decision.ALLOW
        return ItemState(content_id=self.content_id, decision="allow" if allowed else "block",
                         state="visible" if allowed else "removed", final=True, revision=verdict.revision,
                         verdict=verdict)


async def current(store: RedisStore, content_id: str, text_hash: str | None) -> Current:
    """The decision about ``content_id``'s text ``text_hash`` (None: whatever the latest revision is)."""
    revisions, record = await asyncio.gather(
        store.guard(store.redis.hmget(store.key(Namespace.REVISIONS, content_id), "latest", "latest_hash")),
        store.visibility(content_id),
    )
    latest, latest_hash = revisions
    judged = None
    if latest is not None and (text_hash is None or (latest_hash or b"").decode() == text_hash):
        judged = int(latest)
    elif latest is None and text_hash is None and record.verdict is not None:
        judged = record.verdict.revision  # state written without a revisions hash (older workers)
    return Current(content_id, judged, record)


async def wait_final(store: RedisStore, content_id: str, text_hash: str, deadline_s: float,
                     poll_max_s: float) -> tuple[Current, bool, float]:
    """Look until the text has a final verdict or ``deadline_s`` passed: (what is known, timed out, waited s)."""
    start = time.monotonic()
    end = start + max(0.0, deadline_s)
    pause = min(FIRST_POLL_S, poll_max_s)
    while True:
        now_state = await current(store, content_id, text_hash)
        if now_state.final:
            return now_state, False, time.monotonic() - start
        left = end - time.monotonic()
        if left <= 0:
            return now_state, True, time.monotonic() - start
        await asyncio.sleep(min(pause, left))
        pause = min(pause * 2, poll_max_s)
