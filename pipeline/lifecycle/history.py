"""Reading what the pipeline saw and did: a topic between two broker timestamps, and the verdicts that stand.

Where to start reading comes from the broker's offsets-for-times (Kafka ``ListOffsets`` by timestamp: the first
offset whose timestamp is at or after the time asked). A broker may answer that without searching: Tansu 0.6, the
local broker, answers offset 0 for any time, with a timestamp that is not that record's (for a time in the future:
-1). Measured, and ``tests/integration/test_lifecycle_stack.py`` reads a window on it. So an answer is used only
once checked (one fetch: the record at that offset exists and carries the timestamp the broker named, at or after
the time asked); otherwise reading starts at the log start. Either way every record is kept
only if its own timestamp lies in the window, so the result is the same on every broker; offsets-for-times only
saves reading. The end is the offset for ``until`` when the broker's answer checks out; otherwise reading goes
on until a fetch comes back empty at the log end that fetches report (their high watermark: the end ListOffsets
reports may lag behind, and Tansu's does after batched writes, measured), the records' timestamps deciding what
is in the window. Records arriving meanwhile are not waited for.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from pipeline.broker import topic_partitions
from pipeline.codec import Record
from pipeline.config import KafkaSettings
from pipeline.errors import BrokerUnavailable
from pipeline.schemas import Escalation, Verdict, VerdictStatus, parse_wire


@dataclass(frozen=True)
class Span:
    """Offsets ``start`` .. ``end - 1`` of one partition to read; ``exact`` when ``end`` is a checked offset for the
    window's end, else it is the log end the broker reported, which reading goes past if the log holds more."""

    partition: int
    start: int
    end: int
    exact: bool = False

    @property
    def size(self) -> int:
        return max(0, self.end - self.start)


def to_ms(when: datetime | None) -> int | None:
    return None if when is None else int(when.timestamp() * 1000)


async def _verified(consumer: AIOKafkaConsumer, tp: TopicPartition, found: Any, at_ms: int, begin: int,
                    end: int) -> bool:
    """Whether an offsets-for-times answer is what Kafka promises: the record at that offset exists, carries the
    timestamp the broker named, and that timestamp is at or after the time asked (one fetch to check)."""
    if found is None or found.timestamp is None or found.timestamp < at_ms or not begin <= found.offset < end:
        return False
    consumer.assign([tp])
    consumer.seek(tp, found.offset)
    got = await consumer.getmany(tp, timeout_ms=2000, max_records=1)
    first = next(iter(got.get(tp, [])), None)
    return first is not None and first.offset == found.offset and first.timestamp == found.timestamp


async def spans(consumer: AIOKafkaConsumer, topic: str, since_ms: int | None, until_ms: int | None) -> list[Span]:
    """Per partition of ``topic``, the offsets that may hold records of the window (see the module docstring)."""
    tps = await topic_partitions(consumer, topic)
    if not tps:
        return []
    begins = await consumer.beginning_offsets(tps)
    ends = await consumer.end_offsets(tps)
    starts = dict(begins)
    stops = dict(ends)
    exact: set[TopicPartition] = set()
    if since_ms is not None:
        for tp, found in (await consumer.offsets_for_times({tp: since_ms for tp in tps})).items():
            if await _verified(consumer, tp, found, since_ms, begins[tp], ends[tp]):
                starts[tp] = found.offset
    if until_ms is not None:
        for tp, found in (await consumer.offsets_for_times({tp: until_ms for tp in tps})).items():
            if await _verified(consumer, tp, found, until_ms, begins[tp], ends[tp]):
                stops[tp] = max(starts[tp], found.offset)
                exact.add(tp)
    return [Span(tp.partition, starts[tp], stops[tp], tp in exact) for tp in tps]


async def read_window(kafka: KafkaSettings, topic: str, since: datetime | None = None, until: datetime | None = None,
                      *, on_spans: Callable[[list[Span]], None] | None = None,
                      batch: int = 500, timeout_s: float = 30.0) -> AsyncIterator[list[Record]]:
    """The records of ``topic`` whose broker timestamps lie in ``[since, until)``, in batches (per partition in
    offset order). ``on_spans`` learns the offsets to be read first (a progress bar's total). Raises
    BrokerUnavailable when the broker cannot be read."""
    since_ms, until_ms = to_ms(since), to_ms(until)
    consumer = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest", fetch_max_wait_ms=200,
                                request_timeout_ms=int(timeout_s * 1000))
    try:
        await asyncio.wait_for(consumer.start(), timeout_s)
        todo = [s for s in await spans(consumer, topic, since_ms, until_ms) if s.size or not s.exact]
        if on_spans is not None:
            on_spans(todo)
        for span in todo:
            tp = TopicPartition(topic, span.partition)
            consumer.assign([tp])
            consumer.seek(tp, span.start)
            position, stop = span.start, span.end
            idle = 0.0
            while not (span.exact and position >= stop):
                got = await consumer.getmany(tp, timeout_ms=500, max_records=batch)
                messages = got.get(tp, [])
                if not span.exact:
                    # The log end ListOffsets reported may be behind the log (Tansu's is, after batched writes);
                    # a fetch's high watermark is not: read up to it.
                    stop = max(stop, consumer.highwater(tp) or 0)
                if not messages:
                    if position >= stop:
                        break
                    idle += 0.5
                    if idle > timeout_s:
                        raise BrokerUnavailable(f"{topic}[{span.partition}] returned nothing at offset {position} "
                                                f"for {timeout_s:.0f} s (log end {stop})")
                    continue
                idle = 0.0
                out = []
                for m in messages:
                    position = m.offset + 1
                    if span.exact and m.offset >= stop:
                        break
                    if (since_ms is not None and m.timestamp < since_ms) or (until_ms is not None
                                                                           and m.timestamp >= until_ms):
                        continue
                    out.append(Record(topic, span.partition, m.offset, m.key, m.value, m.timestamp))
                if out:
                    yield out
    except (KafkaError, asyncio.TimeoutError, OSError) as exc:
        raise BrokerUnavailable(f"cannot read {topic}: {type(exc).__name__}: {exc}") from exc
    finally:
        await consumer.stop()


async def read_all(kafka: KafkaSettings, topic: str, since: datetime | None = None,
                   until: datetime | None = None) -> list[Record]:
    out: list[Record] = []
    async for records in read_window(kafka, topic, since, until):
        out.extend(records)
    return out


class Verdicts:
    """Final verdicts by item revision, and which one stands: the one no other final verdict of the revision
    supersedes (an appeal outcome, a retroactive verdict); among several such, the latest decided."""

    def __init__(self, verdicts: Iterable[Verdict] = ()) -> None:
        self._by: dict[tuple[str, int], dict[str, Verdict]] = defaultdict(dict)
        for verdict in verdicts:
            self.add(verdict)

    @classmethod
    def from_records(cls, records: Iterable[Record]) -> Verdicts:
        out = cls()
        for record in records:
            try:
                out.add(parse_wire(Verdict, record.value or b""))
            except ValueError:
                continue  # not a verdict this version reads: a platform never gets those either
        return out

    def add(self, verdict: Verdict) -> None:
        if verdict.status is VerdictStatus.FINAL:
            self._by[(verdict.content_id, verdict.revision)][verdict.verdict_id] = verdict

    def standing(self, content_id: str, revision: int) -> Verdict | None:
        finals = self._by.get((content_id, revision))
        if not finals:
            return None
        superseded = {v.supersedes for v in finals.values() if v.supersedes}
        heads = [v for v in finals.values() if v.verdict_id not in superseded] or list(finals.values())
        return max(heads, key=lambda v: v.decided_at)

    def revisions(self, content_id: str) -> list[int]:
        return sorted(rev for cid, rev in self._by if cid == content_id)

    def items(self) -> list[tuple[str, int]]:
        return sorted(self._by)

    def __len__(self) -> int:
        return len(self._by)


def escalations_by_item(records: Iterable[Record]) -> dict[tuple[str, int], Escalation]:
    """The latest escalation of each item revision (its text, triage scores and policies)."""
    out: dict[tuple[str, int], Escalation] = {}
    for record in records:
        try:
            escalation = parse_wire(Escalation, record.value or b"")
        except ValueError:
            continue
        out[(escalation.item.content_id, escalation.revision)] = escalation
    return out
