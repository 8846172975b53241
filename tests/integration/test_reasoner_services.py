"""The reasoner with real services: the Redis verdict cache, `modpipe policy test` against the CPU stand-in on
Triton, and the bench sleep model (its own small Triton, so the session stack never loads it)."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from pipeline.config import PROJECT_ROOT, RedisSettings, ReasonerSettings, Settings, TritonSettings
from pipeline.policies import PolicyLibrary
from pipeline.policies.model import reference_text
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.reasoner.cache import RedisVerdictCache, cache_key
from pipeline.router import ReasoningRoute
from pipeline.schemas import ContentItem, Effort
from pipeline.stack import StackInfo

pytestmark = pytest.mark.integration
LIB = PolicyLibrary.load(PROJECT_ROOT / "policies")


def test_repeated_text_is_served_from_redis_with_a_ttl(local_stack: StackInfo, unique_prefix: str) -> None:
    redis = RedisSettings(url=local_stack.redis_url, key_prefix=unique_prefix)
    triton = TritonSettings(grpc_url=local_stack.triton_grpc, http_url=local_stack.triton_http)
    settings = ReasonerSettings(cache_ttl_s=120)
    text = reference_text("xstest:26", Settings().datasets_dir)  # violence golden row, label 1

    async def go():  # type: ignore[no-untyped-def]
        outcomes = []
        for i in range(2):  # a fresh reasoner (worker restart) still hits the shared cache
            cache = RedisVerdictCache(redis, settings.cache_ttl_s)
            async with SafeguardReasoner(triton, settings, LIB, cache=cache) as reasoner:
                outcomes.append(await reasoner.judge(ContentItem(content_id=f"r{i}", text=text), ["violence"]))
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(local_stack.redis_url)
        key = unique_prefix + cache_key(text, LIB.get("violence").version, Effort.LOW, triton.reasoner_model)
        ttl = await client.ttl(key)
        await client.aclose()
        return outcomes, ttl

    (first, second), ttl = asyncio.run(go())
    assert first.route is second.route is ReasoningRoute.BLOCK
    assert not any(c.cached for c in first.calls) and all(c.cached for c in second.calls)
    assert [c.rule_ids for c in first.calls] == [c.rule_ids for c in second.calls]
    assert first.calls[0].analysis and "CPU stand-in" in first.calls[0].analysis
    assert 0 < ttl <= 120


def test_policy_test_cli_scores_the_golden_set(local_stack: StackInfo, tmp_path: Path) -> None:
    from pipeline.cli.policy import policy_app

    out = tmp_path / "violence.json"
    result = CliRunner().invoke(policy_app, [
        "test", "violence", "--reasoner", f"triton://{local_stack.triton_grpc}/safeguard_standin_cpu",
        "--json-out", str(out), "--min-accuracy", "0.55",
    ])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    c = report["confusion"]
    assert report["rows"] == len(LIB.get("violence").golden) == c["tp"] + c["fp"] + c["fn"] + c["tn"] + c["no_answer"]
    assert c["no_answer"] == 0 and report["hallucinated_citations"] == 0 and report["schema_violations"] == 0
    assert report["truncated_or_unparseable_share"] == 0 and report["truncation_retries"] == 0
    assert report["accuracy"] >= 0.55 and 0 < report["f1"] <= 1  # the stand-in is weak: see docs/POLICIES.md
    assert report["false_positive_traps"]["rows"] >= 10
    assert report["completion_tokens"]["mean"] > 0 and report["prompt_tokens"]["mean"] > 500
    assert report["tokens_from_backend"] and report["latency_ms"]["p50"] > 0
    for source in ("self_report", "logprob"):
        assert 0 <= report["calibration"][source]["ece"] <= 1 and report["calibration"][source]["rows"] == report["rows"]
    assert "confusion matrix" in result.output and "ECE" in result.output


def test_bench_keeps_calls_in_flight_and_serves_duplicates_from_cache(tmp_path: Path) -> None:
    from pipeline.harness.bench.reasoner import run_reasoner_bench

    report = asyncio.run(run_reasoner_bench(
        latency_ms=100, concurrency=16, n_items=160, duplicates=0.25, json_out=tmp_path / "b.json",
        state_dir=tmp_path / f"bench-{uuid.uuid4().hex[:6]}", console=Console(quiet=True), write_docs=False,
    ))
    assert report["errors"] == 0 and report["duplicates"] > 10
    assert report["cache_hit_rate_on_duplicates"] == 1.0
    assert report["model_calls"] == report["items"] - report["duplicates"]
    # serialised calls would give 10 items/s; the ceiling is 160 (16 in flight / 0.1 s)
    assert report["items_per_s"] > 60
    assert report["per_1000_items"]["model_calls"] == round(report["model_calls"] * 1000 / 160, 1)
    assert report["per_1000_items"]["input_tokens"] > 0 and report["per_1000_items"]["output_tokens"] > 0
    assert json.loads((tmp_path / "b.json").read_text())["items"] == 160
