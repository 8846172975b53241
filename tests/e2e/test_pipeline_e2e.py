"""The whole pipeline, end to end, on the real local stack: every item's journey is checked.

Workers run as separate processes exactly as `modpipe demo` starts them; the test reads the output topics like a
platform would and asks the visibility store what a platform may show.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from rich.console import Console

from pipeline.app import Role
from pipeline.config import load_settings
from pipeline.harness.demo import publish_items, pipeline_running, run_chaos
from pipeline.harness.journey import summarise
from pipeline.schemas import Decision, VerdictStatus
from pipeline.store import RedisStore, Visibility
from pipeline.harness.traffic import malformed_messages, sample_items

pytestmark = pytest.mark.e2e


def test_every_item_journey_ends_correctly(isolated_env) -> None:  # type: ignore[no-untyped-def]
    items, malformed = 300, 5

    async def scenario() -> tuple[dict, dict]:
        console = Console(quiet=True)
        async with pipeline_running(isolated_env.state_dir, console, "e2e") as ctx:
            batch = sample_items(items, ctx.run_id, seed=3)
            topic = ctx.settings.kafka.topic(ctx.settings.kafka.incoming_topic)
            for _, key, value in malformed_messages(malformed, ctx.run_id, ctx.settings.triage.max_text_chars):
                await ctx.publisher.send(topic, key, value)
            await publish_items(ctx, batch, 0)
            ids = [i.content_id for i in batch]
            assert await ctx.observer.wait_settled(ids, malformed, 600), "not every item settled in 600 s"
            report = summarise(ctx.observer, ids, len(batch))
            store = RedisStore(load_settings().redis)
            states = {cid: await store.visibility(cid) for cid in ids}
            await store.close()
            journeys = {cid: ctx.observer.journeys[cid] for cid in ids}
        return report, {"states": states, "journeys": journeys}

    report, seen = asyncio.run(scenario())
    assert report["lost"] == 0
    assert report["duplicate_final_verdicts"] == 0
    assert report["journey_errors"] == []
    assert report["dead_letters"] == malformed
    assert report["escalated"] > 0, "the sample should exercise the reasoning path"
    assert report["final_verdicts"] + report["pending_review"] == items

    for cid, journey in seen["journeys"].items():
        state = seen["states"][cid]
        finals = journey.finals
        if finals:
            final = finals[0]
            expected = Visibility.VISIBLE if final.decision is Decision.ALLOW else Visibility.REMOVED
            assert state.state is expected, f"{cid}: store says {state.state}, final verdict says {final.decision}"
            assert state.verdict is not None and state.verdict.verdict_id == final.verdict_id
            if final.stage.value == "reasoner":
                # Escalated: hidden (provisional) before it was decided, evidence recorded.
                assert journey.verdicts[0].status is VerdictStatus.PROVISIONAL
                assert final.reasoner_calls and final.policies
                assert all(p.content_hash for p in final.policies)
            if final.decision is Decision.BLOCK:
                assert not any(v.decision is Decision.ALLOW for v in journey.verdicts), f"{cid} was shown after removal"
            assert final.triage is not None and final.triage.model_version
        else:
            # Waiting for a reviewer: stays hidden.
            assert journey.review_tasks, cid
            assert state.state is Visibility.HIDDEN_PENDING


def test_chaos_kill_worker_and_rebalances_lose_nothing(isolated_env, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    report = asyncio.run(
        run_chaos(
            items=200,
            malformed=10,
            kill_worker=True,
            kill_role=Role.TRIAGE,
            json_out=tmp_path / "chaos.json",
            rate_per_s=50,
            timeout_s=600,
            state_dir=isolated_env.state_dir,
            console=Console(quiet=True),
            workers_of_role=2,
            poison=True,
        )
    )
    assert report["killed_role"] == "triage" and report["workers_of_killed_role"] == 2
    assert report["lost"] == 0, report["lost_ids"]
    assert report["duplicate_final_verdicts"] == 0
    assert report["dead_letters"] == report["dead_letters_expected"] == 10 + 6
    assert report["dead_letters_without_reason"] == 0
    assert report["valid_dead_lettered"] == [] and report["released_while_unreviewed"] == 0
    assert report["worker_restarts"] == {"triage": 1}  # the supervisor restarted the killed worker
    assert (tmp_path / "chaos.json").exists()


# -- the fault drills on the durable stack: a dependency killed with kill -9 and restarted on its own ports ---------


@pytest.fixture(scope="module")
def durable_stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A durable stack of this module's own (broker on local S3, Redis append-only, Triton): the drills kill its
    services, which no other test may share."""
    from pipeline.errors import StackError
    from pipeline.stack import stack_down, stack_up

    state_dir = tmp_path_factory.mktemp("durable_e2e")
    try:
        info = stack_up(state_dir, durable=True, timeout_s=300)
    except StackError as exc:
        pytest.fail(f"durable stack did not start: {exc}", pytrace=False)
    yield info
    stack_down(state_dir)


@pytest.mark.parametrize("kill", ["redis", "broker", "triton"])
def test_drill_dependency_killed_and_restarted_loses_nothing(durable_stack, unique_prefix, monkeypatch,
                                                            tmp_path: Path, kill: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("MODPIPE_STATE_DIR", str(durable_stack.state_dir))
    monkeypatch.setenv("MODPIPE_KAFKA__TOPIC_PREFIX", unique_prefix)
    report = asyncio.run(
        run_chaos(items=120, malformed=5, kill_worker=False, kill_role=Role.TRIAGE, json_out=tmp_path / "drill.json",
                  rate_per_s=20, timeout_s=420, state_dir=durable_stack.state_dir, console=Console(quiet=True),
                  kill=kill, poison=True, down_s=5.0)
    )
    assert report["durable_stack"] and report["drill"] == kill
    assert report["acknowledged"] == report["published"]
    assert report["lost"] == 0, report["lost_ids"]
    assert report["duplicate_final_verdicts"] == 0
    assert report["released_while_unreviewed"] == 0, report["released_ids"]
    assert report["valid_dead_lettered"] == []
    assert report["dead_letters"] == report["dead_letters_expected"]
    assert report["time_to_recover_s"] is not None
