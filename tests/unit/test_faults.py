"""Infrastructure faults and poison pills without Kafka, Redis or Triton: an outage pauses and never condemns, one
bad record never takes its batch-mates with it, a record that crashes its worker is dead-lettered after N
deliveries, a dead letter always fits the broker, and the offset rule restarts a partition only when the log
really ends before the committed offset."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json

import pytest

from pipeline.app import BatchRunner, OffsetCheck, offset_rule
from pipeline.broker import PartitionLag
from pipeline.codec import Record
from pipeline.config import PROJECT_ROOT, KafkaSettings, LimitsSettings, Settings
from pipeline.effects import Effects, RecordingPublisher, guarded
from pipeline.errors import BrokerUnavailable, StoreUnavailable
from pipeline.handlers import TriageHandler
from pipeline.harness.poison import POISON_KINDS, poison_messages
from pipeline.policies import PolicyLibrary
from pipeline.retry import Backoff, Outages, WorkerStalled
from pipeline.schemas import ContentItem, DeadLetter, Verdict, parse_wire
from pipeline.store import InMemoryStore
from pipeline.store.attempts import InMemoryAttempts
from pipeline.triage.fakes import SCRIPTED_THRESHOLDS, ScriptedScorer

pytestmark = pytest.mark.unit

KAFKA = KafkaSettings()
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")
QUIET = {"H": 0.01, "HR": 0.01, "S": 0.0, "S3": 0.0, "SH": 0.0, "V": 0.01}


class FlakyPublisher(RecordingPublisher):
    """Fails the first ``failures`` sends with BrokerUnavailable (what the real publisher raises), then works."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def send(self, topic: str, key: str | bytes | None, value: bytes) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise BrokerUnavailable("broker did not acknowledge: KafkaConnectionError")
        await super().send(topic, key, value)


class FlakyStore(InMemoryStore):
    """The in-memory store, down for the first ``failures`` calls (StoreUnavailable, as Redis down)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    def _check(self) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise StoreUnavailable("redis unavailable: Connection refused")
        super()._check()


def fast_outages(stall_exit_s: float = 30.0, ready: list[bool] | None = None) -> Outages:
    return Outages(backoff_max_s=0.01, stall_exit_s=stall_exit_s,
                   on_ready=(ready.append if ready is not None else None))


def handler(store: InMemoryStore, publisher: RecordingPublisher, outages: Outages, script: dict | None = None,
            limits: LimitsSettings | None = None) -> TriageHandler:
    effects = Effects(KAFKA, store, publisher, outages=outages, limits=limits)
    scorer = ScriptedScorer(SCRIPTED_THRESHOLDS, script or {"good morning": (0.01, QUIET)})
    return TriageHandler(scorer, LIB, effects, max_text_chars=20_000)


def record(value: bytes, offset: int = 1, key: bytes | None = None) -> Record:
    return Record(KAFKA.incoming_topic, 0, offset, key, value, 1_700_000_000_000)


def good(cid: str, text: str = "good morning") -> bytes:
    return ContentItem(content_id=cid, text=text).to_bytes()


def letters(publisher: RecordingPublisher) -> list[DeadLetter]:
    return [parse_wire(DeadLetter, v) for v in publisher.on(KAFKA.deadletter_topic)]


def verdicts(publisher: RecordingPublisher) -> list[Verdict]:
    return [parse_wire(Verdict, v) for v in publisher.on(KAFKA.verdicts_topic)]


# -- outages pause, they never condemn ---------------------------------------------------------------------------


def test_broker_outage_on_publish_pauses_and_publishes_the_verdict_not_a_dead_letter() -> None:
    ready: list[bool] = []
    publisher = FlakyPublisher(failures=3)
    h = handler(InMemoryStore(), publisher, fast_outages(ready=ready))
    asyncio.run(h.handle_batch([record(good("a"))]))
    assert [v.content_id for v in verdicts(publisher)] == ["a"]
    assert letters(publisher) == []
    assert ready == [False, True]  # not ready while paused, ready again after


def test_redis_outage_longer_than_the_store_retries_pauses_and_decides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pipeline.effects.STORE_BACKOFF", Backoff(initial_s=0.001, max_s=0.002))
    store = FlakyStore(failures=12)  # more than the ledger's own retries (STORE_ATTEMPTS = 6 per call)
    publisher = RecordingPublisher()
    outages = fast_outages()
    h = handler(store, publisher, outages)
    asyncio.run(h.handle_batch([record(good("a"))]))
    assert [v.content_id for v in verdicts(publisher)] == ["a"] and letters(publisher) == []
    assert outages.pauses >= 1 and outages.ready


def test_an_outage_past_the_bound_stalls_the_worker_without_a_dead_letter() -> None:
    publisher = RecordingPublisher(fail_with=BrokerUnavailable("broker did not acknowledge"))
    outages = Outages(backoff_max_s=0.01, stall_exit_s=0.05)
    h = handler(InMemoryStore(), publisher, outages)
    with pytest.raises(WorkerStalled, match="broker unavailable"):
        asyncio.run(h.handle_batch([record(good("a"))]))
    assert publisher.sent == []


def test_a_dead_letter_waits_out_a_broker_outage() -> None:
    publisher = FlakyPublisher(failures=2)
    effects = Effects(KAFKA, InMemoryStore(), publisher, outages=fast_outages())
    asyncio.run(guarded(effects, record(b"{broken"), "reasoning", lambda: _raise_schema()))
    (letter,) = letters(publisher)
    assert letter.error_type == "SchemaError"


async def _raise_schema() -> None:
    from pipeline.errors import SchemaError

    raise SchemaError("bad")


# -- poison pills ------------------------------------------------------------------------------------------------


def test_a_lone_surrogate_is_dead_lettered_alone_and_its_batch_mates_are_judged() -> None:
    publisher = RecordingPublisher()
    h = handler(InMemoryStore(), publisher, fast_outages())
    bad = b'{"content_id": "s", "text": "broken \\ud800 text"}'
    asyncio.run(h.handle_batch([record(good("a"), 1), record(bad, 2), record(good("b"), 3)]))
    assert sorted(v.content_id for v in verdicts(publisher)) == ["a", "b"]
    (letter,) = letters(publisher)
    assert letter.content_id == "s" and "surrogate" in letter.error


def test_a_scoring_failure_on_one_text_spares_its_batch_mates() -> None:
    publisher = RecordingPublisher()
    # "poison" is not in the script: scoring any batch that holds it raises, as a tokenizer would.
    h = handler(InMemoryStore(), publisher, fast_outages(), {"good morning": (0.01, QUIET)})
    asyncio.run(h.handle_batch([record(good("a"), 1), record(good("p", "poison"), 2), record(good("b"), 3)]))
    assert sorted(v.content_id for v in verdicts(publisher)) == ["a", "b"]
    (letter,) = letters(publisher)
    assert (letter.content_id, letter.error_type) == ("p", "UnscriptedScore")


@pytest.mark.parametrize("poison", list(poison_messages("run")), ids=lambda p: p.kind)
def test_every_poison_kind_ends_as_its_dead_letter_or_a_verdict(poison) -> None:  # type: ignore[no-untyped-def]
    publisher = RecordingPublisher()
    script = {"good morning, lovely weather today": (0.01, QUIET), "a fine post under a silly key": (0.01, QUIET),
              "good morning": (0.01, QUIET)}
    h = handler(InMemoryStore(), publisher, fast_outages(), script)
    asyncio.run(h.handle_batch([record(poison.value, key=poison.key), record(good("mate"), 2)]))
    assert "mate" in [v.content_id for v in verdicts(publisher)]
    expected = POISON_KINDS[poison.kind]
    if expected is None:
        assert poison.content_id in [v.content_id for v in verdicts(publisher)] and letters(publisher) == []
        return
    (letter,) = letters(publisher)
    assert letter.error_type == expected and letter.error
    assert len(DeadLetter.to_bytes(letter)) < 200 * 1024  # fits any broker's default message limit (1 MiB)
    assert letter.raw_length == len(poison.value)
    assert letter.raw_sha256 == hashlib.sha256(poison.value).hexdigest()
    assert "run-poison" in base64.b64decode(letter.raw_base64).decode("utf-8", "replace")


def test_a_huge_value_is_truncated_in_its_dead_letter_with_length_and_digest() -> None:
    value = b'{"content_id": "big", "text": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    effects = Effects(KAFKA, InMemoryStore(), RecordingPublisher(), limits=LimitsSettings(dead_letter_raw_bytes=1000))
    letter = effects.letter(record(value, key=b"k" * 5000), "triage", ValueError("too big"))
    assert letter.raw_truncated and letter.raw_length == len(value)
    assert base64.b64decode(letter.raw_base64) == value[:1000]
    assert letter.key_truncated and letter.key_length == 5000 and len(base64.b64decode(letter.key or "")) == 1024


def test_a_version_1_dead_letter_is_read_with_its_length_and_digest() -> None:
    v1 = {"schema_version": 1, "stage": "triage", "error_type": "SchemaError", "error": "bad", "topic": "t",
          "raw_base64": base64.b64encode(b"{broken").decode(), "attempts": 1}
    letter = parse_wire(DeadLetter, json.dumps(v1))
    assert letter.schema_version == 2 and letter.raw_length == 7 and not letter.raw_truncated
    assert letter.raw_sha256 == hashlib.sha256(b"{broken").hexdigest()


# -- crash loops -------------------------------------------------------------------------------------------------


class CrashOn:
    """A handler whose process 'dies' (raises SystemExit, as os._exit would end it) on one content id."""

    stage = "triage"

    def __init__(self, effects: Effects, crasher: bytes) -> None:
        self.effects = effects
        self.crasher = crasher
        self.handled: list[int] = []

    async def handle_batch(self, records) -> None:  # type: ignore[no-untyped-def]
        for r in records:
            if r.value == self.crasher:
                raise SystemExit(70)
        self.handled.extend(r.offset for r in records)


def test_a_record_that_kills_its_worker_is_dead_lettered_after_n_tries_and_its_batch_mates_are_handled() -> None:
    publisher = RecordingPublisher()
    effects = Effects(KAFKA, InMemoryStore(), publisher, outages=fast_outages())
    attempts = InMemoryAttempts()  # survives the "restarts" below, as Redis does
    batch = [record(good("a"), 1), record(b"crash", 2), record(good("c"), 3)]
    deliveries = 0
    while True:
        deliveries += 1
        handler_ = CrashOn(effects, b"crash")  # a fresh process each time
        try:
            asyncio.run(BatchRunner(handler_, attempts, max_attempts=3).run(batch))
            break
        except SystemExit:
            assert deliveries < 10, "crash loop not broken"
    (letter,) = letters(publisher)
    assert (letter.error_type, letter.offset, letter.attempts) == ("CrashLoop", 2, 3)
    assert handler_.handled == [1, 3]
    assert deliveries == 5  # one batch delivery, three alone, then the dead letter
    assert attempts.counts == {}


def test_counting_waits_out_a_redis_outage() -> None:
    attempts = InMemoryAttempts()
    attempts.available = False
    effects = Effects(KAFKA, InMemoryStore(), RecordingPublisher(), outages=Outages(backoff_max_s=0.01,
                                                                                     stall_exit_s=0.05))
    with pytest.raises(WorkerStalled, match="redis"):
        asyncio.run(BatchRunner(CrashOn(effects, b"x"), attempts, max_attempts=3).run([record(good("a"))]))


# -- the offset rule ---------------------------------------------------------------------------------------------


def test_offset_rule_keeps_an_offset_whose_record_is_there(monkeypatch: pytest.MonkeyPatch) -> None:
    async def present(*_: object, **__: object) -> bool:
        return True

    monkeypatch.setattr("pipeline.app.record_at", present)
    stale = PartitionLag(partition=0, committed=311, start=0, end=287)  # a broker reporting a stale end
    assert asyncio.run(offset_rule(Settings(), "t", stale)) == OffsetCheck(0, 311, 287, None)


def test_offset_rule_restarts_a_recreated_partition_from_the_log_start(monkeypatch: pytest.MonkeyPatch) -> None:
    async def absent(*_: object, **__: object) -> bool:
        return False

    monkeypatch.setattr("pipeline.app.record_at", absent)
    recreated = PartitionLag(partition=2, committed=220, start=0, end=28)
    assert asyncio.run(offset_rule(Settings(), "t", recreated)) == OffsetCheck(2, 220, 28, 0)
    fine = PartitionLag(partition=1, committed=20, start=0, end=28)
    assert asyncio.run(offset_rule(Settings(), "t", fine)) is None
    assert fine.lag == 8 and recreated.lag == 0 and recreated.beyond_end


def test_a_record_the_consumer_skipped_is_fetched_and_handled_first() -> None:
    effects = Effects(KAFKA, InMemoryStore(), RecordingPublisher(), outages=fast_outages())
    handled = CrashOn(effects, b"never")
    log = {5: record(good("e"), 5), 6: record(good("f"), 6)}
    asked: list[tuple[int, int]] = []

    async def fill(topic: str, partition: int, start: int, end: int) -> list[Record]:
        asked.append((start, end))
        return [log[o] for o in range(start, end) if o in log]

    runner = BatchRunner(handled, InMemoryAttempts(), max_attempts=3, fill_gap=fill)
    asyncio.run(runner.run([record(good("d"), 4)]))
    asyncio.run(runner.run([record(good("g"), 7), record(good("h"), 8)]))  # 5 and 6 never arrived
    assert asked == [(5, 7)]
    assert handled.handled == [4, 5, 6, 7, 8]
    runner.state.last_offset.clear()  # a new assignment: the next record starts a new run of offsets
    asyncio.run(runner.run([record(good("x"), 20)]))
    assert asked == [(5, 7)]
