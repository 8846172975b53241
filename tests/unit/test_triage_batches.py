"""The triage handler decides a batch's new items together (one store round trip and one produce call per step)
and leaves redeliveries, edits, repeated ids, bad policies and failed steps to the one-by-one path, with the same
outcome as deciding every item alone."""

from __future__ import annotations

import asyncio

import pytest

from pipeline.codec import Record
from pipeline.config import PROJECT_ROOT, KafkaSettings
from pipeline.effects import Effects, RecordingPublisher
from pipeline.errors import BrokerUnavailable
from pipeline.handlers import TriageHandler
from pipeline.policies import PolicyLibrary
from pipeline.retry import Outages
from pipeline.schemas import ContentItem, DeadLetter, Decision, Escalation, Verdict, VerdictStatus, parse_wire
from pipeline.store import EffectKind, InMemoryStore, Visibility, item_effect
from pipeline.triage.fakes import SCRIPTED_THRESHOLDS, ScriptedScorer

pytestmark = pytest.mark.unit

KAFKA = KafkaSettings()
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
QUIET = {"H": 0.01, "HR": 0.01, "S": 0.0, "S3": 0.0, "SH": 0.0}
SCRIPT = {
    "good morning everyone": (0.01, {**QUIET, "V": 0.01}),
    "i will hurt you": (0.95, {**QUIET, "V": 0.93}),
    "is this a threat?": (0.5, {**QUIET, "V": 0.45}),
    "lovely weather": (0.02, {**QUIET, "V": 0.01}),
}


class CountingStore(InMemoryStore):
    """The in-memory store, counting calls by method name."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: dict[str, int] = {}

    def __getattribute__(self, name: str):  # type: ignore[no-untyped-def]
        if name in ("record", "record_many", "recorded", "recorded_many", "mark_published", "mark_published_many",
                    "revision", "revisions"):
            calls = object.__getattribute__(self, "calls")
            calls[name] = calls.get(name, 0) + 1
        return object.__getattribute__(self, name)


class CountingPublisher(RecordingPublisher):
    """Records like RecordingPublisher; counts ``send`` and ``send_many`` calls; ``fail_batches`` makes that many
    ``send_many`` calls raise BrokerUnavailable before sending anything (``send`` keeps working)."""

    def __init__(self, fail_batches: int = 0) -> None:
        super().__init__()
        self.singles = 0
        self.batches = 0
        self.fail_batches = fail_batches

    async def send(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        self.singles += 1
        await super().send(topic, key, value)

    async def send_many(self, messages: list[tuple[str, str | bytes | None, bytes]]) -> None:
        self.batches += 1
        if self.fail_batches > 0:
            self.fail_batches -= 1
            raise BrokerUnavailable("broker did not acknowledge: KafkaConnectionError")
        for topic, key, value in messages:
            await RecordingPublisher.send(self, topic, key, value)


class Run:
    def __init__(self, publisher: CountingPublisher | None = None) -> None:
        self.store = CountingStore()
        self.publisher = publisher or CountingPublisher()
        outages = Outages(backoff_max_s=0.01, stall_exit_s=30.0)
        self.handler = TriageHandler(ScriptedScorer(SCRIPTED_THRESHOLDS, SCRIPT), LIB,
                                     Effects(KAFKA, self.store, self.publisher, outages=outages), max_text_chars=1000)
        self.offset = 0

    def batch(self, *items: ContentItem) -> None:
        records = []
        for item in items:
            self.offset += 1
            records.append(Record(KAFKA.incoming_topic, 0, self.offset, None, item.to_bytes(), 1_700_000_000_000))
        asyncio.run(self.handler.handle_batch(records))

    def verdicts(self) -> list[Verdict]:
        return [parse_wire(Verdict, v) for v in self.publisher.on(KAFKA.verdicts_topic)]

    def escalations(self) -> list[Escalation]:
        return [parse_wire(Escalation, v) for v in self.publisher.on(KAFKA.escalations_topic)]

    def letters(self) -> list[DeadLetter]:
        return [parse_wire(DeadLetter, v) for v in self.publisher.on(KAFKA.deadletter_topic)]


def item(cid: str, text: str, **extra: object) -> ContentItem:
    return ContentItem(content_id=cid, text=text, **extra)


def test_new_items_are_decided_together_one_call_per_step() -> None:
    run = Run()
    run.batch(item("a", "good morning everyone"), item("b", "i will hurt you"), item("c", "is this a threat?"),
              item("d", "lovely weather"))
    decided = {v.content_id: v for v in run.verdicts()}
    assert {cid: (v.status, v.decision) for cid, v in decided.items()} == {
        "a": (VerdictStatus.FINAL, Decision.ALLOW), "b": (VerdictStatus.FINAL, Decision.BLOCK),
        "c": (VerdictStatus.PROVISIONAL, Decision.HIDE_PENDING), "d": (VerdictStatus.FINAL, Decision.ALLOW)}
    assert [e.item.content_id for e in run.escalations()] == ["c"]
    # Every verdict (the hide included) is published before any escalation.
    topics = [topic for topic, _, _ in run.publisher.sent]
    assert topics == [KAFKA.verdicts_topic] * 4 + [KAFKA.escalations_topic]
    assert run.publisher.batches == 2 and run.publisher.singles == 0
    assert run.store.calls == {"revisions": 1, "recorded_many": 1, "record_many": 2, "mark_published_many": 2}
    assert asyncio.run(run.store.visibility("c")).state is Visibility.HIDDEN_PENDING
    assert asyncio.run(run.store.visibility("b")).state is Visibility.REMOVED
    assert asyncio.run(run.store.recorded_many([])) == []


def test_a_redelivery_in_a_batch_republishes_its_verdict_and_decides_nothing_new() -> None:
    run = Run()
    run.batch(item("a", "good morning everyone"))
    first = run.verdicts()[0]
    run.batch(item("a", "good morning everyone"), item("e", "lovely weather"))
    again = [v for v in run.verdicts() if v.content_id == "a"]
    assert {v.verdict_id for v in again} == {first.verdict_id}
    assert [v.content_id for v in run.verdicts()].count("e") == 1


def test_an_id_twice_in_one_batch_gets_one_verdict() -> None:
    run = Run()
    run.batch(item("a", "good morning everyone"), item("a", "good morning everyone"), item("f", "lovely weather"))
    assert len({v.verdict_id for v in run.verdicts() if v.content_id == "a"}) == 1
    assert run.letters() == []


def test_an_edit_in_a_batch_supersedes_the_earlier_verdict() -> None:
    run = Run()
    run.batch(item("a", "good morning everyone"))
    first = run.verdicts()[0]
    run.batch(item("a", "i will hurt you"), item("g", "lovely weather"))
    edited = [v for v in run.verdicts() if v.content_id == "a" and v.revision == 2]
    assert len(edited) == 1 and edited[0].supersedes == first.verdict_id and edited[0].decision is Decision.BLOCK


def test_an_item_whose_policies_do_not_resolve_is_dead_lettered_alone() -> None:
    run = Run()
    run.batch(item("p", "is this a threat?", policy_ids=["no_such_policy"]), item("h", "lovely weather"))
    (letter,) = run.letters()
    assert (letter.content_id, letter.error_type) == ("p", "PolicyError")
    assert [v.content_id for v in run.verdicts()] == ["h"]


def test_a_failed_publish_step_is_finished_one_by_one_with_the_same_verdicts() -> None:
    run = Run(CountingPublisher(fail_batches=1))
    run.batch(item("a", "good morning everyone"), item("c", "is this a threat?"))
    verdicts = run.verdicts()
    assert sorted((v.content_id, v.status.value) for v in verdicts) == [("a", "final"), ("c", "provisional")]
    assert [e.item.content_id for e in run.escalations()] == ["c"]
    assert run.letters() == []
    # The verdicts recorded by the failed batch are the ones published: nothing was decided twice.
    kinds = {VerdictStatus.FINAL: EffectKind.FINAL, VerdictStatus.PROVISIONAL: EffectKind.PROVISIONAL}
    stored = asyncio.run(run.store.recorded_many([(kinds[v.status], item_effect(v.content_id, 1)) for v in verdicts]))
    assert [parse_wire(Verdict, s.payload).verdict_id for s in stored if s is not None] == \
        [v.verdict_id for v in verdicts]
    assert all(s is not None and s.published for s in stored)


def test_a_large_batch_is_embedded_in_chunks_and_decided_in_order() -> None:
    run = Run()
    run.handler.embed_batch = 2
    texts = ["good morning everyone", "is this a threat?", "lovely weather", "i will hurt you", "lovely weather"]
    run.batch(*(item(f"k{i}", text) for i, text in enumerate(texts)))
    assert [len(b) for b in run.handler.model.batches] == [2, 2, 1]  # type: ignore[attr-defined]
    order = [parse_wire(Verdict, v).content_id for v in run.publisher.on(KAFKA.verdicts_topic)]
    assert order == ["k0", "k1", "k2", "k3", "k4"]
    sent = [(topic, key) for topic, key, _ in run.publisher.sent]
    # Chunk by chunk: k1's hide, then its escalation, before the next chunk's verdicts.
    assert sent.index((KAFKA.escalations_topic, b"k1")) < sent.index((KAFKA.verdicts_topic, b"k2"))
    assert sent.index((KAFKA.verdicts_topic, b"k1")) < sent.index((KAFKA.escalations_topic, b"k1"))


def test_a_chunk_that_cannot_be_published_stops_the_batch_with_its_error() -> None:
    run = Run()
    run.handler.embed_batch = 1
    run.publisher.fail_with = ConnectionError("broker gone")
    with pytest.raises(ConnectionError):
        run.batch(item("a", "good morning everyone"), item("b", "lovely weather"))
    assert run.publisher.sent == []
