"""The policy lifecycle end to end: worker processes as an operator runs them, the CLI as a policy author runs it.

A candidate of the test policy ``pets`` that makes pet sales a violation is shadowed by the running reasoning
worker, reported and backtested; promoted while items keep arriving (every item is judged by exactly one version,
and the workers switch without a restart); then retroaction, run twice, supersedes each affected verdict once.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.config import PROJECT_ROOT
from pipeline.harness.demo import pipeline_running
from pipeline.lifecycle.history import read_all
from pipeline.policies.versions import find_version
from pipeline.policies import PolicyLibrary
from pipeline.schemas import (
    ContentItem,
    Decision,
    PolicyAction,
    PolicyAudit,
    ShadowResult,
    Stage,
    Verdict,
    VerdictStatus,
    is_policy_audit,
    parse_wire,
)
from pipeline.store import RedisStore, Visibility

pytestmark = pytest.mark.e2e

SALES = [
    "Selling two kittens, 50 dollars each, message me",
    "Golden retriever puppies for sale, 400 each, both parents on site",
    "Breeder ad: French bulldog puppies available now, price on request",
    "Kittens for sale, 80 each, litter trained",
    "Puppies ready for new homes, 250 dollars, first shots done",
    "Persian kittens for sale from a registered breeder",
]
OTHERS = [
    "Took my dog to the vet today, he was very brave",
    "Here is a photo of my cat sleeping on the keyboard",
    "Walked the dogs along the beach this morning",
    "Fed the rabbits and cleaned their hutch",
    "Going to put rat poison out for the cats next door",
    "Cock fight tonight, place your bets",
    "Our shelter has dogs looking for a home, adoption is free",
    "Brushing the dog's fur every evening keeps it shiny",
]
TEXTS = SALES + OTHERS


@pytest.fixture
def lifecycle_env(local_stack, unique_prefix, monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    policies = tmp_path / "policies"
    shutil.copytree(PROJECT_ROOT / "policies", policies)
    shutil.copytree(PROJECT_ROOT / "tests" / "fixtures" / "lifecycle" / "pets", policies / "pets")
    env = {
        "MODPIPE_STATE_DIR": str(local_stack.state_dir),
        "MODPIPE_KAFKA__TOPIC_PREFIX": unique_prefix,
        "MODPIPE_REDIS__KEY_PREFIX": unique_prefix,
        "MODPIPE_REASONER__POLICIES_DIR": str(policies),
        "MODPIPE_LIFECYCLE__REFRESH_S": "0.5",
        "MODPIPE_LIFECYCLE__SHADOW_SAMPLE": "1.0",
        "MODPIPE_LIFECYCLE__SHADOW_CALLS_PER_S": "100",
        "MODPIPE_LIFECYCLE__SHADOW_MAX_IN_FLIGHT": "64",  # shadow every item of a burst (the default skips some)
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return local_stack, policies, env


async def modpipe(env: dict[str, str], *args: str, timeout_s: float = 300) -> str:
    """Run ``modpipe ARGS`` as an operator would (its own process); the output, or the test fails with it."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "pipeline.cli", *args, env={**os.environ, **env, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout_s)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, f"modpipe {' '.join(args)} exited {proc.returncode}:\n{text[-4000:]}"
    return text


def pets_calls(verdict: Verdict) -> set[str]:
    return {c.policy.version for c in verdict.reasoner_calls if c.policy.policy_id == "pets"}


def test_shadow_backtest_promote_under_traffic_and_retroact_twice(lifecycle_env,  # type: ignore[no-untyped-def]
                                                                  tmp_path: Path) -> None:
    stack, policies, env = lifecycle_env
    library = PolicyLibrary.load(policies)
    base = library.get("pets")
    candidate = find_version(base.folder, "no-sales")
    assert candidate is not None

    async def scenario() -> dict:
        console = Console(quiet=True)
        async with pipeline_running(stack.state_dir, console, "lc", worker_env=env) as ctx:
            kafka = ctx.settings.kafka
            incoming = kafka.topic(kafka.incoming_topic)
            started = datetime.now(timezone.utc) - timedelta(seconds=2)

            def items(wave: str, n: int) -> list[ContentItem]:
                return [ContentItem(content_id=f"{ctx.run_id}-{wave}-{i}", text=TEXTS[i % len(TEXTS)],
                                    policy_ids=["pets"]) for i in range(n)]

            # 1. Shadow the candidate, then live traffic: the reasoning worker judges it beside the base.
            await modpipe(env, "policy", "shadow", "pets", "no-sales", "--reason", "try the sales ban",
                          "--actor", "ann")
            await asyncio.sleep(1.5)  # the workers' refresh picks the registration up
            wave1 = items("w1", len(TEXTS))
            for item in wave1:
                await ctx.publisher.send(incoming, item.content_id, item.to_bytes())
            ids1 = [i.content_id for i in wave1]
            assert await ctx.observer.wait_settled(ids1, 0, 300), "wave 1 did not settle"
            sales1 = {i.content_id for i in wave1 if i.text in SALES}
            judged = {c for c in ids1 if ctx.observer.journeys[c].review_tasks
                      or ctx.observer.journeys[c].finals[0].stage is Stage.REASONER}
            deadline = time.monotonic() + 120
            shadowed: set[str] = set()
            while time.monotonic() < deadline and not shadowed >= judged:  # they run after the verdicts
                await asyncio.sleep(1)
                records = await read_all(kafka, kafka.topic(kafka.shadow_topic))
                shadowed = {parse_wire(ShadowResult, r.value).content_id for r in records}
            assert shadowed >= judged, f"not shadowed: {sorted(judged - shadowed)}"
            judged_sales = judged & sales1
            report_out = await modpipe(env, "policy", "shadow-report", "pets", "--json-out",
                                       str(tmp_path / "shadow.json"))
            backtest_out = await modpipe(env, "policy", "backtest", "pets", "--candidate", "no-sales", "--from",
                                         started.isoformat(), "--out", str(tmp_path / "bt"), "--yes")

            # 2. Promote while items keep arriving.
            wave2 = items("w2", 3 * len(TEXTS))
            promoted = asyncio.Event()
            published_after: list[str] = []

            async def traffic() -> None:
                for n, item in enumerate(wave2):
                    if n == len(wave2) - 10:
                        await promoted.wait()  # the last ten arrive once the fleet switched: the candidate's
                    if promoted.is_set():
                        published_after.append(item.content_id)
                    await ctx.publisher.send(incoming, item.content_id, item.to_bytes())
                    await asyncio.sleep(0.25)

            async def promote() -> str:
                await asyncio.sleep(3)
                out = await modpipe(env, "policy", "promote", "pets", "no-sales", "--reason", "sales are banned now",
                                    "--actor", "ann", "--wait", "60")
                promoted.set()
                return out

            _, promote_out = await asyncio.gather(traffic(), promote())
            ids2 = [i.content_id for i in wave2]
            assert await ctx.observer.wait_settled(ids2, 0, 300), "wave 2 did not settle"
            journeys = {cid: ctx.observer.journeys[cid] for cid in ids1 + ids2}
            dead_letters = dict(ctx.observer.dead_letters)

            # 3. Retroaction, twice.
            first = await modpipe(env, "policy", "retroact", "pets", "--since", started.isoformat(), "--reason",
                                  "apply the sales ban to what was decided", "--actor", "ann", "--yes",
                                  "--json-out", str(tmp_path / "retro1.json"))
            second = await modpipe(env, "policy", "retroact", "pets", "--since", started.isoformat(), "--reason",
                                   "again", "--actor", "ann", "--yes", "--json-out", str(tmp_path / "retro2.json"))
            verdicts = [parse_wire(Verdict, r.value) for r in await read_all(kafka, kafka.topic(kafka.verdicts_topic))]
            audits = [PolicyAudit.model_validate_json(r.value) for r in await read_all(
                kafka, kafka.topic(kafka.decisions_topic)) if is_policy_audit(r.value)]
            store = RedisStore(ctx.settings.redis)
            states = {cid: await store.visibility(cid) for cid in ids1 + ids2}
            await store.close()
        return {"journeys": journeys, "dead_letters": dead_letters, "sales1": judged_sales,
                "texts": {i.content_id: i.text for i in wave1 + wave2},
                "after": published_after, "verdicts": verdicts, "audits": audits, "states": states,
                "outputs": (report_out, backtest_out, promote_out, first, second)}

    seen = asyncio.run(scenario())
    base_v, cand_v = base.version, candidate.version

    # Shadow and backtest reported the known flips: the escalated sale items, nothing else.
    shadow = json.loads((tmp_path / "shadow.json").read_text())
    shadow_flips = {e["content_id"] for e in shadow["flips"]["to_violation"]["examples"]}
    assert shadow["candidate"] == cand_v and shadow["flips"]["to_allowed"]["count"] == 0
    assert shadow_flips == seen["sales1"] and len(shadow_flips) == len(SALES)  # every sale item, nothing else
    backtest = json.loads((tmp_path / "bt" / "report.json").read_text())
    assert {e["content_id"] for e in backtest["flips"]["to_violation"]["examples"]} == shadow_flips
    assert backtest["flips"]["to_allowed"]["count"] == 0

    # No item was judged by no version: every item settled, nothing dead-lettered, every pets call names one of the
    # two versions; what arrived after the fleet switched was judged by the candidate.
    assert seen["dead_letters"] == {}
    versions_seen = set()
    for cid, journey in seen["journeys"].items():
        assert journey.settled, cid
        decided = journey.finals[0] if journey.finals else None
        calls = decided.reasoner_calls if decided is not None else journey.review_tasks[0].reasoner_calls
        if decided is not None and decided.stage is Stage.TRIAGE:
            continue
        named = {c.policy.version for c in calls if c.policy.policy_id == "pets"}
        assert len(named) == 1 and named <= {base_v, cand_v}, (cid, named)
        assert not any(c.error and "PolicyError" in c.error for c in calls), cid
        versions_seen |= named
        if cid in seen["after"]:
            assert named == {cand_v}, f"{cid} arrived after the promotion but was judged by {named}"
    assert versions_seen == {base_v, cand_v}
    assert "live workers enforce" in seen["outputs"][2], seen["outputs"][2]

    # Retroaction: each sale item decided under the base is superseded once, by a removal; the rest unchanged.
    retro1 = json.loads((tmp_path / "retro1.json").read_text())
    retro2 = json.loads((tmp_path / "retro2.json").read_text())
    superseding = [v for v in seen["verdicts"] if v.supersedes and v.rationale.startswith("retroaction")]
    base_sales = [c for c, j in seen["journeys"].items() if seen["texts"][c] in SALES and j.finals
                  and pets_calls(j.finals[0]) == {base_v}]
    assert retro1["published"] == len(superseding) == len(base_sales) > 0 and retro2.get("published", 0) == 0
    assert len({v.content_id for v in superseding}) == len(superseding)  # each once, across both runs
    for verdict in superseding:
        original = seen["journeys"][verdict.content_id].finals[0]
        assert verdict.supersedes == original.verdict_id and pets_calls(original) == {base_v}
        assert (verdict.decision, verdict.status, pets_calls(verdict)) == (Decision.BLOCK, VerdictStatus.FINAL,
                                                                           {cand_v})
        assert seen["states"][verdict.content_id].state is Visibility.REMOVED
        assert seen["states"][verdict.content_id].verdict.verdict_id == verdict.verdict_id
        assert seen["texts"][verdict.content_id] in SALES
    assert retro2["already"] + retro2.get("unchanged", 0) >= retro1.get("unchanged", 0)

    # Every lifecycle step is on the audit topic with who and why.
    actions = [a.action for a in seen["audits"]]
    assert actions.count(PolicyAction.PROMOTE) == 1 and actions.count(PolicyAction.SHADOW_START) == 1
    assert actions.count(PolicyAction.RETROACT_START) == 2 and actions.count(PolicyAction.RETROACT_END) == 2
    items = [a for a in seen["audits"] if a.action is PolicyAction.RETROACT_ITEM and a.outcome == "published"]
    assert sorted(a.content_id for a in items) == sorted(v.content_id for v in superseding)
    assert all(a.actor_id == "ann" and a.reason for a in seen["audits"])
