"""The policy lifecycle without Kafka, Redis or Triton: versions on disk, the live swap, the verdict cache across
versions, shadow judgements under their budget, the comparison report, promotion gates and audit, retroaction.

The test policy ``tests/fixtures/lifecycle/pets`` has a base version that allows pet sales (PW0.c) and a candidate
(``candidates/no-sales.md``) that makes them a violation (PW1.d): the flips every test expects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT, KafkaSettings, LifecycleSettings, ReasonerSettings, Settings, TritonSettings
from pipeline.effects import Effects, RecordingPublisher
from pipeline.errors import PolicyError
from pipeline.handlers import ReasoningHandler
from pipeline.lifecycle.compare import Answer, Pair, compare, enforced_answer, plot, settled_answer, summary_text
from pipeline.lifecycle.history import Verdicts
from pipeline.lifecycle.live import LivePolicies, open_live
from pipeline.lifecycle.promote import Lifecycle, LifecycleError
from pipeline.lifecycle.registry import Enforcing, InMemoryPolicyRegistry, ShadowRegistration, StoredText
from pipeline.lifecycle.retro import Retroaction
from pipeline.lifecycle.shadow import ShadowRunner, TokenBucket, sampled
from pipeline.policies import PolicyLibrary
from pipeline.policies.model import content_hash
from pipeline.policies.versions import add_candidate, find_version, load_version, version_files
from pipeline.codec import Record
from pipeline.reasoner.cache import InMemoryVerdictCache
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.reasoner.fakes import ScriptedTransport, answer
from pipeline.router import ReasoningRoute
from pipeline.schemas import (
    ContentItem,
    Decision,
    Escalation,
    EscalationReason,
    PolicyAction,
    PolicyAudit,
    ReviewDecision,
    ShadowResult,
    Stage,
    TriageScores,
    Verdict,
    is_policy_audit,
    read_audit,
)
from pipeline.store import EffectKind, InMemoryStore, Visibility, item_effect, retro_effect

pytestmark = pytest.mark.unit

FIXTURES = PROJECT_ROOT / "tests" / "fixtures" / "lifecycle"
KAFKA = KafkaSettings()
FAST = TritonSettings(backoff_initial_s=0.001, backoff_max_s=0.002, request_timeout_s=2.0, max_attempts=2)
SALE = "Selling two kittens, 50 dollars each, message me"
VET = "Took my dog to the vet today, he was very brave"
TRIAGE = TriageScores(model_version="t", violation=0.3, categories={}, latency_ms=1.0)


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    """A private copy of the fixture policies (tests add candidates to it)."""
    target = tmp_path / "policies"
    shutil.copytree(FIXTURES, target)
    return target


def libraries(policies: Path):  # type: ignore[no-untyped-def]
    base_lib = PolicyLibrary.load(policies)
    base = base_lib.get("pets")
    found = find_version(base.folder, "no-sales")
    assert found is not None
    cand = load_version(base.folder, found.text, found.path.name)
    return base_lib, base, cand


def transport_for(base, cand, script):  # type: ignore[no-untyped-def]
    """A scripted transport that tells the two versions apart (keys 'pets@base' and 'pets@cand')."""
    labelled = [dataclasses.replace(base, policy_id="pets@base"), dataclasses.replace(cand, policy_id="pets@cand")]
    return ScriptedTransport(labelled, script)  # type: ignore[arg-type]


def settings_for(policies: Path, **lifecycle: object) -> Settings:
    return Settings(reasoner=ReasonerSettings(policies_dir=policies), lifecycle=LifecycleSettings(**lifecycle))


def item(cid: str, text: str) -> ContentItem:
    return ContentItem(content_id=cid, text=text, policy_ids=["pets"])


# -- versions on disk, metadata, wire models --------------------------------------------------------------------------


def test_a_candidate_shares_metadata_and_golden_set_and_its_version_is_its_hash(policies: Path) -> None:
    _, base, cand = libraries(policies)
    assert cand.version == content_hash(cand.text) != base.version
    assert (cand.severity, cand.scope, cand.golden, cand.golden_bar) == (base.severity, base.scope, base.golden, 0.75)
    assert "PW1.d" in cand.rule_ids and "PW1.d" not in base.rule_ids
    assert cand.policy_file == "no-sales.md" and base.policy_file == "policy.md"


def test_versions_are_found_by_hash_prefix_name_or_base(policies: Path) -> None:
    _, base, cand = libraries(policies)
    folder = base.folder
    assert find_version(folder, cand.version).version == cand.version
    assert find_version(folder, cand.version[:6]).version == cand.version
    assert find_version(folder, "no-sales.md").version == cand.version
    assert find_version(folder, "base").version == base.version
    assert find_version(folder, "ffffffff") is None
    assert [f.name for f in version_files(folder)] == ["base", "no-sales"]


def test_add_candidate_copies_the_text_byte_for_byte(policies: Path, tmp_path: Path) -> None:
    _, base, _ = libraries(policies)
    source = tmp_path / "stricter.md"
    source.write_text(base.text.replace("funny stories", "stories"), encoding="utf-8")
    added = add_candidate(base.folder, source)
    assert added.path == base.folder / "candidates" / "stricter.md" and added.text == source.read_text()
    source.write_text("another text")
    with pytest.raises(PolicyError, match="exists with another text"):
        add_candidate(base.folder, source)
    with pytest.raises(PolicyError):
        add_candidate(base.folder, source, name="../escape")


def test_a_policy_audit_is_told_apart_from_a_review_decision_on_one_topic() -> None:
    audit = PolicyAudit(audit_id="a", action=PolicyAction.PROMOTE, policy_id="pets", version="v2", actor_id="ann")
    review = ReviewDecision(decision_id="d", content_id="c", task_id="t", action="decide", actor_id="r",
                            actor_role="reviewer")
    assert is_policy_audit(audit.to_bytes()) and not is_policy_audit(review.to_bytes())
    assert isinstance(read_audit(audit.to_bytes()), PolicyAudit)
    assert isinstance(read_audit(review.to_bytes()), ReviewDecision)


# -- the verdict cache across versions ---------------------------------------------------------------------------------


def test_a_new_version_never_serves_the_old_versions_cached_answer(policies: Path) -> None:
    base_lib, base, cand = libraries(policies)
    transport = transport_for(base, cand, {("pets@base", "low"): [answer(0, ["PW0.c"], 0.95)],
                                           ("pets@cand", "low"): [answer(1, ["PW1.d"], 0.95)]})
    cache = InMemoryVerdictCache()
    reasoner = SafeguardReasoner(FAST, ReasonerSettings(), base_lib, transport=transport, cache=cache)

    async def go():  # type: ignore[no-untyped-def]
        async with reasoner:
            first = await reasoner.judge(item("a", SALE), ["pets"])
            again = await reasoner.judge(item("b", SALE), ["pets"])  # the same text, the same version: cached
            reasoner.use_library(PolicyLibrary({"pets": cand}))
            promoted = await reasoner.judge(item("c", SALE), ["pets"])
            return first, again, promoted

    first, again, promoted = asyncio.run(go())
    transport.assert_done()  # one model call per version: the candidate was asked, not served the base's answer
    assert (first.route, first.calls[0].policy.version, first.calls[0].cached) == (ReasoningRoute.ALLOW, base.version,
                                                                                   False)
    assert again.calls[0].cached and again.calls[0].policy.version == base.version
    assert (promoted.route, promoted.calls[0].policy.version, promoted.calls[0].cached) == (
        ReasoningRoute.BLOCK, cand.version, False)


# -- live policies: the swap -----------------------------------------------------------------------------------------


def test_workers_swap_to_a_promoted_version_and_back_without_a_restart(policies: Path) -> None:
    base_lib, base, cand = libraries(policies)
    registry = InMemoryPolicyRegistry()
    seen: list[str] = []

    async def go() -> None:
        live = await open_live(base_lib, registry, LifecycleSettings(), ReasonerSettings(), worker="w1")
        live.subscribe(lambda lib: seen.append(lib.get("pets").version))
        assert live.library.get("pets").version == base.version and not await live.refresh()
        registry.pointers["pets"] = Enforcing("pets", cand.version, (base.version,))
        assert await live.refresh() and live.library.get("pets").version == cand.version
        registry.available = False  # an outage keeps what enforces
        assert not await live.refresh() and live.library.get("pets").version == cand.version
        registry.available = True
        registry.pointers["pets"] = Enforcing("pets", base.version, ())
        assert await live.refresh() and live.library.get("pets") is base
        assert (await registry.loaded(60))["w1"]["enforcing"] == {"pets": base.version}

    asyncio.run(go())
    assert seen == [cand.version, base.version]


def test_a_restarted_worker_enforces_the_promoted_version_from_the_first_item(policies: Path) -> None:
    base_lib, _, cand = libraries(policies)
    registry = InMemoryPolicyRegistry(pointers={"pets": Enforcing("pets", cand.version)})
    live = asyncio.run(open_live(base_lib, registry, LifecycleSettings(), ReasonerSettings()))
    assert live.library.get("pets").version == cand.version
    registry.available = False
    with pytest.raises(Exception):  # start-up must not fall back to the base silently
        asyncio.run(open_live(base_lib, registry, LifecycleSettings(), ReasonerSettings()))


def test_a_version_only_the_registry_holds_is_loaded_if_it_hashes_to_its_version(policies: Path) -> None:
    base_lib, base, cand = libraries(policies)
    (base.folder / "candidates" / "no-sales.md").unlink()  # this worker's image lacks the candidate file
    registry = InMemoryPolicyRegistry(pointers={"pets": Enforcing("pets", cand.version)})
    registry.texts[("pets", cand.version)] = StoredText(cand.text + "tampered", "no-sales.md")
    live = LivePolicies(base_lib, registry, LifecycleSettings(), ReasonerSettings())
    asyncio.run(live.refresh())
    assert live.library.get("pets").version == base.version  # refused: the text does not hash to the version
    registry.texts[("pets", cand.version)] = StoredText(cand.text, "no-sales.md")
    fresh = LivePolicies(base_lib, registry, LifecycleSettings(), ReasonerSettings())
    asyncio.run(fresh.refresh())
    assert fresh.library.get("pets").version == cand.version


def test_a_version_a_subscriber_refuses_is_not_swapped_in(policies: Path) -> None:
    base_lib, _, cand = libraries(policies)
    registry = InMemoryPolicyRegistry()
    live = asyncio.run(open_live(base_lib, registry, LifecycleSettings(), ReasonerSettings()))

    def refuse(_lib: PolicyLibrary) -> None:
        raise PolicyError("prompt too long")

    live.subscribe(refuse)
    registry.pointers["pets"] = Enforcing("pets", cand.version)
    assert not asyncio.run(live.refresh())
    assert live.library.get("pets").version != cand.version


# -- shadow ------------------------------------------------------------------------------------------------------------


def test_sampling_is_deterministic_and_near_the_share() -> None:
    chosen = [sampled(f"c{i}", 1, "pets", "v", 0.25) for i in range(4000)]
    assert chosen == [sampled(f"c{i}", 1, "pets", "v", 0.25) for i in range(4000)]
    assert 0.22 < sum(chosen) / len(chosen) < 0.28
    assert all(sampled("x", 1, "p", "v", 1.0) for _ in range(3)) and not sampled("x", 1, "p", "v", 0.0)


def test_the_token_bucket_bounds_the_call_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, clock=lambda: now[0])
    assert bucket.take(1) and bucket.take(1) and not bucket.take(1)  # 2 saved up, then empty
    now[0] += 0.5
    assert bucket.take(1) and not bucket.take(1)  # 1 token per half second
    bucket.debit(3)  # a judgement that cost more than reserved pays afterwards
    now[0] += 1.0
    assert not bucket.take(1)  # still below one token
    assert not TokenBucket(0.0).take(1)


class ShadowHarness:
    def __init__(self, policies: Path, script: dict, **lifecycle: object) -> None:
        self.base_lib, self.base, self.cand = libraries(policies)
        self.registry = InMemoryPolicyRegistry()
        self.lifecycle = LifecycleSettings(**{"shadow_sample": 1.0, **lifecycle})
        self.store = InMemoryStore()
        self.publisher = RecordingPublisher()
        self.effects = Effects(KAFKA, self.store, self.publisher)
        self.transport = transport_for(self.base, self.cand, script)
        self.reasoner = SafeguardReasoner(FAST, ReasonerSettings(), self.base_lib, transport=self.transport)
        self.offset = 0

    def escalation(self, cid: str, text: str) -> Record:
        self.offset += 1
        esc = Escalation(item=item(cid, text), triage=TRIAGE, reason=EscalationReason.AMBIGUOUS, policy_ids=["pets"],
                         ingested_at=datetime.now(timezone.utc))
        return Record(KAFKA.escalations_topic, 0, self.offset, None, esc.to_bytes(), 1_700_000_000_000)

    async def run(self, *records: Record) -> ShadowRunner:
        await self.registry.set_shadow(ShadowRegistration("pets", self.cand.version), PolicyAudit(
            audit_id="s", action=PolicyAction.SHADOW_START, policy_id="pets", version=self.cand.version, actor_id="a"))
        live = await open_live(self.base_lib, self.registry, self.lifecycle, ReasonerSettings(), shadowing=True)
        runner = ShadowRunner(self.reasoner, live, self.publisher, KAFKA.shadow_topic, self.lifecycle)
        handler = ReasoningHandler(self.reasoner, live.library, self.effects, shadow=runner)
        async with self.reasoner:
            for record in records:
                await handler.handle(record)
            await runner.drain()
        return runner

    def shadows(self) -> list[ShadowResult]:
        return [ShadowResult.model_validate_json(v) for v in self.publisher.on(KAFKA.shadow_topic)]

    def verdicts(self) -> list[Verdict]:
        return [Verdict.model_validate_json(v) for v in self.publisher.on(KAFKA.verdicts_topic)]


def test_a_shadowed_candidate_is_judged_and_recorded_but_never_enforced(policies: Path) -> None:
    h = ShadowHarness(policies, {("pets@base", "low"): [answer(0, ["PW0.c"], 0.95, "a sale is fine")],
                                 ("pets@cand", "low"): [answer(1, ["PW1.d"], 0.95, "sells kittens")]})
    asyncio.run(h.run(h.escalation("k1", SALE)))
    h.transport.assert_done()
    (verdict,) = h.verdicts()
    assert (verdict.decision, verdict.policies[0].version) == (Decision.ALLOW, h.base.version)
    assert asyncio.run(h.store.visibility("k1")).state is Visibility.VISIBLE  # the candidate changed nothing
    (shadow,) = h.shadows()
    assert (shadow.policy.version, shadow.enforced_policy.version) == (h.cand.version, h.base.version)
    assert (shadow.violation, shadow.decision, shadow.rule_ids) == (True, Decision.BLOCK, ["PW1.d"])
    assert (shadow.enforced_violation, shadow.enforced_rule_ids, shadow.enforced_decision) == (False, ["PW0.c"],
                                                                                               Decision.ALLOW)
    assert shadow.verdict_id == verdict.verdict_id and shadow.reasoner_calls[0].rationale == "sells kittens"
    assert shadow.triage == TRIAGE


def test_shadowing_over_its_budget_or_bound_is_skipped_never_waited_for(policies: Path) -> None:
    script = {("pets@base", "low"): [answer(0, ["PW0.a"], 0.95)] * 3, ("pets@cand", "low"): [answer(0, ["PW0.a"], 0.95)]}
    h = ShadowHarness(policies, script, shadow_calls_per_s=0.001)  # one call saved up, then none for ages
    asyncio.run(h.run(*(h.escalation(f"v{i}", f"{VET} {i}") for i in range(3))))
    h.transport.assert_done()
    assert len(h.verdicts()) == 3 and len(h.shadows()) == 1  # enforcement judged all three
    off = ShadowHarness(policies, {("pets@base", "low"): [answer(0, ["PW0.a"], 0.95)]}, shadow_calls_per_s=0.0)
    asyncio.run(off.run(off.escalation("v", VET)))
    assert off.shadows() == [] and len(off.verdicts()) == 1


def test_a_failing_shadow_judgement_leaves_the_enforced_verdict_alone(policies: Path) -> None:
    from pipeline.errors import ReasonerUnavailable

    down = ReasonerUnavailable("gone")
    h = ShadowHarness(policies, {("pets@base", "low"): [answer(0, ["PW0.a"], 0.95)],
                                 ("pets@cand", "low"): [down, down]})
    asyncio.run(h.run(h.escalation("v", VET)))
    assert len(h.verdicts()) == 1 and h.publisher.on(KAFKA.deadletter_topic) == []
    (shadow,) = h.shadows()
    assert shadow.violation is None and shadow.decision is None and shadow.reasoner_calls[0].failure is not None


# -- the comparison report ---------------------------------------------------------------------------------------------


def reasoner_verdict(cid: str, violation: int, rule: str, version: str, *, decision: Decision | None = None,
                     revision: int = 1, stage: Stage = Stage.REASONER, supersedes: str | None = None) -> Verdict:
    from pipeline.schemas import PolicyRef, ReasonerCall

    ref = PolicyRef(policy_id="pets", version=version, content_hash=version)
    call = ReasonerCall(policy=ref, model="m", effort="low", violation=bool(violation), confidence=0.9,
                        rule_ids=[rule], latency_ms=1.0)
    chosen = decision or (Decision.BLOCK if violation else Decision.ALLOW)
    return Verdict.final(cid, chosen, stage, revision=revision, policies=[ref], reasoner_calls=[call],
                         rule_ids=[rule], triage=TRIAGE, supersedes=supersedes)


def test_enforced_answers_come_from_the_deciding_stage() -> None:
    v = reasoner_verdict("a", 0, "PW0.c", "v1")
    assert enforced_answer(v, "pets") == Answer(False, ("PW0.c",), "reasoner", "v1")
    review = reasoner_verdict("b", 0, "PW1.a", "v1", decision=Decision.BLOCK, stage=Stage.REVIEW)
    assert enforced_answer(review, "pets", frozenset({"PW1.a"})).violation is True
    assert enforced_answer(review, "hate").violation is None  # a removal under another policy says nothing here
    triage = Verdict.final("c", Decision.ALLOW, Stage.TRIAGE)
    assert enforced_answer(triage, "pets") == Answer(False, (), "triage", None)
    assert settled_answer([], "pets") == (None, ())


def test_the_report_counts_agreement_flips_each_way_rules_and_cost(tmp_path: Path) -> None:
    def pair(cid: str, cand: bool | None, enf: bool | None, rule: str = "PW1.d") -> Pair:
        return Pair(cid, 1, Answer(cand, (rule,) if cand else ("PW0.a",), "candidate", "v2"),
                    Answer(enf, ("PW0.c",) if enf is False else ("PW1.a",), "reasoner", "v1"))

    pairs = [pair("s1", True, False), pair("s2", True, False), pair("ok", False, False), pair("bad", True, True),
             pair("down", False, True), pair("unsure", None, False), pair("enf-unsure", True, None)]
    report = compare("pets", "v2", pairs, kind="backtest", not_compared={"no_final_verdict": 2})
    assert (report["items"], report["compared"], report["agree"], report["agreement"]) == (7, 5, 2, 0.4)
    assert report["flips"]["to_violation"]["count"] == 2
    assert [e["content_id"] for e in report["flips"]["to_violation"]["examples"]] == ["s1", "s2"]
    assert report["flips"]["to_allowed"]["examples"][0]["enforced_rules"] == ["PW1.a"]
    assert report["candidate_unsettled"]["count"] == 1 and report["enforced_unsettled"] == 1
    assert report["rules"]["to_violation"] == {"PW1.d": 2} and report["rules"]["to_allowed"] == {"PW1.a": 1}
    assert report["enforced_versions"] == {"v1": 7} and report["not_compared"] == {"no_final_verdict": 2}
    assert "agreement 40.0%" in summary_text(report)
    assert plot(report, tmp_path / "r.png").stat().st_size > 1000


def test_the_standing_verdict_is_the_one_nothing_supersedes() -> None:
    first = reasoner_verdict("a", 0, "PW0.c", "v1")
    retro = reasoner_verdict("a", 1, "PW1.d", "v2", supersedes=first.verdict_id)
    index = Verdicts([retro, first, reasoner_verdict("b", 0, "PW0.a", "v1", revision=2)])
    assert index.standing("a", 1).verdict_id == retro.verdict_id
    assert index.revisions("b") == [2] and index.standing("b", 1) is None


# -- promotion, rollback, audit -----------------------------------------------------------------------------------------


def golden(version: str, accuracy: float) -> dict:
    return {"version": version, "rows": 16, "accuracy": accuracy, "model": "m", "effort": "low", "f1": 0.9}


def test_promotion_needs_its_gates_and_is_audited_with_who_and_why(policies: Path) -> None:
    base_lib, base, cand = libraries(policies)
    registry, sink = InMemoryPolicyRegistry(), RecordingPublisher()
    lc = Lifecycle(settings_for(policies), registry, sink, base_lib)

    async def go() -> None:
        with pytest.raises(LifecycleError, match="golden: accuracy 0.700.*report: no backtest"):
            await lc.promote("pets", "no-sales", "ann", "ban sales", golden(cand.version, 0.70))
        await registry.put_report("pets", cand.version, "backtest", {"kind": "backtest", "compared": 20,
                                                                      "agreement": 0.7})
        with pytest.raises(LifecycleError, match="golden"):
            await lc.promote("pets", "no-sales", "ann", "ban sales", golden(base.version, 0.99))  # another version's
        entry = await lc.promote("pets", "no-sales", "ann", "ban sales", golden(cand.version, 0.9375))
        assert (entry.action, entry.version, entry.previous_version, entry.actor_id, entry.reason) == (
            PolicyAction.PROMOTE, cand.version, base.version, "ann", "ban sales")
        assert entry.evidence["golden_accuracy"] == 0.9375 and entry.evidence["backtest_compared"] == 20
        pointer = registry.pointers["pets"]
        assert (pointer.version, pointer.previous, pointer.actor) == (cand.version, (base.version,), "ann")
        assert registry.texts[("pets", base.version)].text == base.text  # both texts stored for every worker
        with pytest.raises(LifecycleError, match="already enforces"):
            await lc.promote("pets", cand.version, "ann", "again", golden(cand.version, 0.9375))
        back = await lc.rollback("pets", "bob", "too strict")
        assert (back.version, back.previous_version, back.actor_id) == (base.version, cand.version, "bob")
        assert registry.pointers["pets"].version == base.version
        with pytest.raises(LifecycleError, match="nothing to roll back"):
            await lc.rollback("pets", "bob", "again")

    asyncio.run(go())
    published = [PolicyAudit.model_validate_json(v) for v in sink.on(KAFKA.decisions_topic)]
    assert [a.action for a in published] == [PolicyAction.PROMOTE, PolicyAction.ROLLBACK]
    assert registry.outbox_table == {}  # everything recorded was published


def test_a_promotion_racing_another_fails_instead_of_overwriting_it(policies: Path) -> None:
    base_lib, base, cand = libraries(policies)
    registry = InMemoryPolicyRegistry()
    audit = PolicyAudit(audit_id="x", action=PolicyAction.PROMOTE, policy_id="pets", version="v", actor_id="a")
    assert asyncio.run(registry.change_enforcing(Enforcing("pets", cand.version), None, audit))
    assert not asyncio.run(registry.change_enforcing(Enforcing("pets", "other"), None, audit))
    assert registry.pointers["pets"].version == cand.version


def test_shadow_start_and_stop_are_audited(policies: Path) -> None:
    base_lib, base, cand = libraries(policies)
    registry, sink = InMemoryPolicyRegistry(), RecordingPublisher()
    lc = Lifecycle(settings_for(policies), registry, sink, base_lib)
    asyncio.run(lc.shadow_start("pets", "no-sales", "ann", "try it", 0.5))
    assert [(r.version, r.sample) for r in asyncio.run(registry.shadows())] == [(cand.version, 0.5)]
    with pytest.raises(LifecycleError, match="enforcing version"):
        asyncio.run(lc.shadow_start("pets", "base", "ann", "pointless"))
    assert asyncio.run(lc.shadow_stop("pets", cand.version[:8], "ann", "enough"))
    actions = [PolicyAudit.model_validate_json(v).action for v in sink.on(KAFKA.decisions_topic)]
    assert actions == [PolicyAction.SHADOW_START, PolicyAction.SHADOW_STOP]


# -- retroaction -------------------------------------------------------------------------------------------------------


class RetroHarness:
    """Items decided under the base version, then the candidate promoted; retroaction over an in-memory store."""

    def __init__(self, policies: Path, script: dict) -> None:
        self.base_lib, self.base, self.cand = libraries(policies)
        self.settings = settings_for(policies)
        self.store = InMemoryStore()
        self.sink = RecordingPublisher()
        self.registry = InMemoryPolicyRegistry(pointers={"pets": Enforcing("pets", self.cand.version,
                                                                            (self.base.version,))})
        self.transport = transport_for(self.base, self.cand, script)
        self.escalations: dict[tuple[str, int], Escalation] = {}
        self.decided: list[Verdict] = []

    def decide(self, cid: str, text: str, violation: int, rule: str, stage: Stage = Stage.REASONER) -> Verdict:
        verdict = reasoner_verdict(cid, violation, rule, self.base.version, stage=stage)
        asyncio.run(self.store.record(EffectKind.FINAL, item_effect(cid, 1), verdict.to_bytes(), verdict))
        self.escalations[(cid, 1)] = Escalation(item=item(cid, text), triage=TRIAGE,
                                                reason=EscalationReason.AMBIGUOUS, policy_ids=["pets"],
                                                ingested_at=datetime.now(timezone.utc))
        self.decided.append(verdict)
        return verdict

    def run(self, in_review: set[str] = frozenset(), budget: int | None = None) -> dict:  # type: ignore[assignment]
        async def go() -> dict:
            library = PolicyLibrary({"pets": self.cand})
            reasoner = SafeguardReasoner(FAST, ReasonerSettings(), library, transport=self.transport)
            lc = Lifecycle(self.settings, self.registry, self.sink, self.base_lib, store=self.store)

            async def reviewing(cid: str) -> bool:
                return cid in in_review

            retro = Retroaction(self.settings, self.store, self.sink, lc, reasoner, self.cand, actor="ann",
                                reason="apply the sales ban", in_review=reviewing)
            found = await retro.select(Verdicts(self.decided), self.escalations)
            async with reasoner:
                result = await retro.run(found.targets, budget=budget, concurrency=1)
            return {**result, "skipped": dict(found.skipped)}

        return asyncio.run(go())

    def verdicts(self) -> list[Verdict]:
        return [Verdict.model_validate_json(v) for v in self.sink.on(KAFKA.verdicts_topic)]

    def audits(self) -> list[PolicyAudit]:
        return [PolicyAudit.model_validate_json(v) for v in self.sink.on(KAFKA.decisions_topic)]


def test_retroaction_supersedes_what_changed_and_is_idempotent(policies: Path) -> None:
    h = RetroHarness(policies, {("pets@cand", "low"): [answer(1, ["PW1.d"], 0.95, "sale"),
                                                       answer(0, ["PW0.a"], 0.95, "care")]})
    sale = h.decide("sale", SALE, 0, "PW0.c")
    h.decide("vet", VET, 0, "PW0.a")
    reviewed = h.decide("reviewed", SALE + " again", 0, "PW0.c", stage=Stage.REVIEW)
    first = h.run()
    h.transport.assert_done()
    assert (first["published"], first["unchanged"], first["skipped"]) == (1, 1, {"skipped_reviewed": 1})
    (new,) = h.verdicts()
    assert (new.content_id, new.decision, new.supersedes, new.revision) == ("sale", Decision.BLOCK,
                                                                             sale.verdict_id, 1)
    assert new.policies[0].version == h.cand.version and "retroaction" in new.rationale
    vis = asyncio.run(h.store.visibility("sale"))
    assert (vis.state, vis.verdict.verdict_id) == (Visibility.REMOVED, new.verdict_id)
    assert asyncio.run(h.store.visibility("reviewed")).verdict.verdict_id == reviewed.verdict_id  # never a machine's
    # The original slot still holds the original verdict: the retroactive one has a slot of its own.
    assert json.loads(asyncio.run(h.store.recorded(EffectKind.FINAL, item_effect("sale", 1))).payload)[
        "verdict_id"] == sale.verdict_id
    assert asyncio.run(h.store.recorded(EffectKind.FINAL, retro_effect("sale", 1, "pets", h.cand.version))) is not None
    items = {a.content_id: a for a in h.audits() if a.action is PolicyAction.RETROACT_ITEM}
    assert (items["sale"].outcome, items["sale"].verdict_id, items["vet"].outcome) == ("published", new.verdict_id,
                                                                                      "unchanged")
    # Twice: the superseding verdict now stands under the new version, the vet item's slot says it was done.
    h.decided.append(new)
    second = h.run()
    assert second.get("published", 0) == 0 and second["already"] == 1
    assert second["skipped"] == {"already_this_version": 1, "skipped_reviewed": 1}
    assert len(h.verdicts()) == 1  # each superseding verdict published once
    assert sum(a.content_id == "sale" and a.action is PolicyAction.RETROACT_ITEM for a in h.audits()) == 1


def test_retroaction_skips_items_under_review_and_stops_at_its_budget(policies: Path) -> None:
    h = RetroHarness(policies, {("pets@cand", "low"): [answer(1, ["PW1.d"], 0.95)]})
    h.decide("appealed", SALE, 0, "PW0.c")
    h.decide("s2", SALE + " 2", 0, "PW0.c")
    h.decide("s3", SALE + " 3", 0, "PW0.c")
    result = h.run(in_review={"appealed"}, budget=2)
    assert (result["skipped_in_review"], result["published"], result["left_for_budget"]) == (1, 1, 1)
    assert [v.content_id for v in h.verdicts()] == ["s2"]
    assert asyncio.run(h.store.visibility("appealed")).state is Visibility.VISIBLE


def test_retroaction_finishes_a_verdict_a_crash_left_unpublished(policies: Path) -> None:
    h = RetroHarness(policies, {})
    sale = h.decide("sale", SALE, 0, "PW0.c")
    slot = retro_effect("sale", 1, "pets", h.cand.version)
    pending = Verdict.final("sale", Decision.BLOCK, Stage.REASONER, supersedes=sale.verdict_id, triage=TRIAGE)
    asyncio.run(h.store.record(EffectKind.FINAL, slot, pending.to_bytes()))  # recorded, then the run died
    result = h.run()
    assert result["published"] == 1 and [v.verdict_id for v in h.verdicts()] == [pending.verdict_id]
    assert h.transport.calls == []  # nothing judged again


def test_parse_time_reads_iso_and_relative_times() -> None:
    from pipeline.cli.policy_lifecycle import parse_time

    assert parse_time("2026-12-01T10:00:00Z") == datetime(2026, 12, 1, 10, tzinfo=timezone.utc)
    assert parse_time("2026-12-01T10:00:00") == datetime(2026, 12, 1, 10, tzinfo=timezone.utc)
    before = datetime.now(timezone.utc)
    two_hours_ago = parse_time("-2h")
    assert before - timedelta(hours=2) <= two_hours_ago <= datetime.now(timezone.utc) - timedelta(hours=2)
    assert parse_time(None) is None


def test_a_shadow_hook_that_raises_never_fails_the_judged_message(policies: Path) -> None:
    class Broken:
        def offer(self, *args: object) -> int:
            raise RuntimeError("bug in shadowing")

    h = ShadowHarness(policies, {("pets@base", "low"): [answer(0, ["PW0.a"], 0.95)]})
    handler = ReasoningHandler(h.reasoner, h.base_lib, h.effects, shadow=Broken())

    async def go() -> None:
        async with h.reasoner:
            await handler.handle(h.escalation("v", VET))

    asyncio.run(go())
    assert len(h.verdicts()) == 1 and h.publisher.on(KAFKA.deadletter_topic) == []


def test_triage_harvest_reads_the_reviewers_entries_among_the_lifecycles() -> None:
    from triage_models.loop import harvest

    audit = PolicyAudit(audit_id="a", action=PolicyAction.PROMOTE, policy_id="pets", version="v2", actor_id="ann")
    result = harvest(decisions=[audit.to_bytes(), audit.model_dump()])
    assert result.counts["review_decisions"] == 0
