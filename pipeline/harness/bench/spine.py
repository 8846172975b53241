"""``modpipe bench spine``: throughput and latency of the running pipeline, measured as ratios in one run.

Timed assertions in tests are flaky on a shared 2-core machine; instead this command measures, in the same
process and minutes, the embedder alone and the triage stage end to end (Kafka in, verdict out), and writes both
(and their ratio) to ``docs/BENCHMARKS.md``, so a regression shows as a ratio that moved, not a noisy absolute.
Texts are the project's sample traffic, made distinct past the pool's size (as replies), so no phase is served by
the embedding or verdict cache a repeated text would hit.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline.host import machine_summary
from pipeline.harness.bench.docs import markers, replace_section
from pipeline.harness.demo import publish_items, pipeline_running
from pipeline.reports import percentile, write_json
from pipeline.schemas import VerdictStatus
from pipeline.harness.traffic import sample_items, sample_texts



def embedder_throughput(texts: list[str], batch_size: int) -> float:
    """Texts per second through the worker's embedder alone (same batch size as the triage agent)."""
    from pipeline.config import load_settings
    from pipeline.triage import TriageModel

    settings = load_settings()
    model = TriageModel.load(
        settings.triage.model_dir, settings=settings.triage, triton_grpc_url=settings.triton.grpc_url
    )
    model.warm_up()  # first call pays for lazy initialisation; a text outside the sample keeps the cache cold
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        model.score(texts[i : i + batch_size])
    return len(texts) / (time.perf_counter() - start)


async def run_spine_bench(throughput_items: int, steady_rate: float, steady_seconds: float, json_out: Path | None,
                          state_dir: Path, console: Console) -> dict:
    # A private Redis keyspace: the reasoner's verdict cache starts cold, as it would for new traffic.
    keyspace = f"modpipe-bench-{uuid.uuid4().hex[:8]}:"
    async with pipeline_running(state_dir, console, "bench", redis_key_prefix=keyspace) as ctx:
        batch_size = ctx.settings.triage.batch_size
        console.print(f"[bold]embedder alone[/]: {throughput_items} texts, batch {batch_size}")
        embed_per_s = await asyncio.get_running_loop().run_in_executor(
            None, embedder_throughput, sample_texts(throughput_items, seed=7, distinct=True), batch_size
        )
        console.print(f"  {embed_per_s:.1f} texts/s")

        console.print(f"[bold]triage end to end[/]: {throughput_items} items published as fast as possible")
        burst = sample_items(throughput_items, f"{ctx.run_id}-burst", seed=7, distinct=True)
        t0 = time.monotonic()
        await publish_items(ctx, burst, 0)
        burst_ids = [i.content_id for i in burst]
        if not await ctx.observer.wait_triaged(burst_ids, 900):
            raise TimeoutError("triage did not finish the burst within 900 s")
        pipeline_per_s = throughput_items / (time.monotonic() - t0)
        console.print(f"  {pipeline_per_s:.1f} items/s")
        # Let the reasoner drain the burst's escalations, so the steady phase measures steady state, not backlog.
        console.print("  waiting for the burst's escalations to settle")
        await ctx.observer.wait_settled(burst_ids, 0, 900)

        steady_n = int(steady_rate * steady_seconds)
        console.print(f"[bold]steady load[/]: {steady_n} items at {steady_rate:g}/s")
        steady = sample_items(steady_n, f"{ctx.run_id}-steady", seed=8, distinct=True)
        await publish_items(ctx, steady, steady_rate)
        steady_ids = [i.content_id for i in steady]
        await ctx.observer.wait_settled(steady_ids, 0, 600)
        triage_ms, final_ms, triage_final_ms, reasoner_final_ms = [], [], [], []
        for cid in steady_ids:
            verdicts = ctx.observer.journeys[cid].verdicts
            first = next((v for v in verdicts if v.stage.value == "triage"), None)
            if first and first.latency.since_ingest_ms is not None:
                triage_ms.append(first.latency.since_ingest_ms)
            final = next((v for v in verdicts if v.status is VerdictStatus.FINAL), None)
            if final and final.latency.since_ingest_ms is not None:
                final_ms.append(final.latency.since_ingest_ms)
                (triage_final_ms if final.stage.value == "triage" else reasoner_final_ms).append(
                    final.latency.since_ingest_ms
                )
    report = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "embedder_per_s": round(embed_per_s, 1),
        "pipeline_triage_per_s": round(pipeline_per_s, 1),
        "pipeline_to_embedder_ratio": round(pipeline_per_s / embed_per_s, 3),
        "steady_rate_per_s": steady_rate,
        "steady_items": steady_n,
        "latency_ms": {
            "triage_verdict_p50": percentile(triage_ms, 50),
            "triage_verdict_p99": percentile(triage_ms, 99),
            "final_p50": percentile(final_ms, 50),
            "final_p99": percentile(final_ms, 99),
            "final_by_triage_p50": percentile(triage_final_ms, 50),
            "final_by_reasoner_p50": percentile(reasoner_final_ms, 50),
            "final_by_reasoner_p99": percentile(reasoner_final_ms, 99),
        },
        "finals_by_reasoner": len(reasoner_final_ms),
    }
    write_json(json_out, report)
    _write_markdown(report)
    console.print_json(data=report)
    return report



def _write_markdown(report: dict) -> None:
    """Replace the spine section of docs/BENCHMARKS.md, keeping every other section."""
    begin, end = markers("spine")
    lat = report["latency_ms"]
    body = f"""{begin}
## Spine: triage throughput and verdict latency (`modpipe bench spine`)

Measured {report['measured_at']} on {report['machine']}; local stack (Tansu memory broker, Redis, Triton CPU
stand-in reasoner); one worker per role, all on the same machine.

| measure | value |
|---|---|
| embedder alone (the triage worker's model, same batch size) | {report['embedder_per_s']} texts/s |
| triage stage end to end (Kafka in, verdict out, burst) | {report['pipeline_triage_per_s']} items/s |
| ratio pipeline / embedder | {report['pipeline_to_embedder_ratio']} |
| steady load | {report['steady_items']} items at {report['steady_rate_per_s']}/s |
| triage verdict latency p50 / p99 | {lat['triage_verdict_p50']} / {lat['triage_verdict_p99']} ms |
| final verdict latency p50 / p99 (all) | {lat['final_p50']} / {lat['final_p99']} ms |
| final verdict latency p50 / p99 (decided by the reasoner, {report['finals_by_reasoner']} items) \
| {lat['final_by_reasoner_p50']} / {lat['final_by_reasoner_p99']} ms |

Latency is from the item's broker timestamp on `content.incoming` to the verdict's `decided_at`.
{end}"""
    replace_section("spine", body)
