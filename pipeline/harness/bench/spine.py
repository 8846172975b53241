"""``modpipe bench spine``: triage throughput end to end against its embedder alone, and verdict latency at a steady
rate, measured as ratios in one run.

Timed assertions in tests are flaky on a shared 2-core machine; instead this command measures, in the same process
and minutes, the embedder alone and the triage stage end to end (Kafka in, verdict out), on the same texts, in
alternating rounds (best round of each), and writes both and their ratio to ``docs/BENCHMARKS.md``, so a regression
shows as a ratio that moved, not a noisy absolute.

- Triage alone: only the triage worker runs (as in production, where the reasoner runs on GPUs elsewhere). Each
  round embeds texts T in this process, then publishes items with exactly the texts T as one burst and times it
  until the last triage verdict. Every round has new texts (the project's sample traffic, made distinct past the
  pool's size as replies), so neither the worker's embedding cache nor this process's serves a repeat, and a
  warm-up burst outside the sample brings connections and thread pools up first. Beside the rates, the worker's
  own ``modpipe_triage_latency_seconds`` (scraped before and after each burst) says which share of the burst it
  spent embedding: measured in the same process at the same moment, the machine's load moves both sides alike.
- With every role: the same burst once more with the reasoning and review-intake workers (and the CPU stand-in on
  Triton) on the same cores, then a steady load, for the verdict latencies a user of the local stack sees.

Every phase runs in a keyspace of its own (fresh topics and Redis keys: the verdict cache starts cold).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline.app import Role
from pipeline.harness.bench.docs import markers, replace_section
from pipeline.harness.demo import RunContext, pipeline_running, publish_items
from pipeline.harness.journey import stage_latencies
from pipeline.harness.load import load_average
from pipeline.harness.traffic import sample_items
from pipeline.host import machine_summary
from pipeline.reports import write_json


def embedder_throughput(texts: list[str], batch_size: int) -> float:
    """Texts per second through the worker's scoring path alone (same model, settings and batch size as the triage
    agent: embedder, lexical view, language detection, heads)."""
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


def _embedding_seconds(metrics_port: int | None) -> float | None:
    """The triage worker's ``modpipe_triage_latency_seconds`` sum: seconds it has spent embedding and scoring."""
    if not metrics_port:
        return None
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as answer:
            text = answer.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("modpipe_triage_latency_seconds_sum"):
            return float(line.split()[-1])
    return None


async def _burst(ctx: RunContext, items: list, label: str) -> tuple[float, float | None]:
    """Publish ``items`` at once. Returns items/s from the first send to the last triage verdict, and the stage's
    rate while busy: items/s between its first and its last triage verdict (``decided_at``), which leaves out
    the fixed cost of one burst (the first fetch, the last batch's round trips) that the first figure includes."""
    t0 = time.monotonic()
    await publish_items(ctx, items, 0)
    ids = [i.content_id for i in items]
    if not await ctx.observer.wait_triaged(ids, 900):
        raise TimeoutError(f"triage did not finish the {label} burst within 900 s")
    wall = len(items) / (time.monotonic() - t0)
    decided = sorted(next(v.decided_at for v in ctx.observer.journeys[c].verdicts if v.stage.value == "triage")
                     for c in ids)
    span = (decided[-1] - decided[0]).total_seconds()
    return wall, ((len(decided) - 1) / span if span > 0 else None)


async def _rounds(ctx: RunContext, items_n: int, rounds: int, seed: int, console: Console, warm_n: int,
                  metrics_port: int | None = None) -> dict:
    """A warm-up burst of ``warm_n`` items, then ``rounds`` of embedder alone / end to end, every item a new text
    (one distinct sequence for the phase: the worker's embedding cache never serves one)."""
    loop = asyncio.get_running_loop()
    batch_size = ctx.settings.triage.batch_size
    await _burst(ctx, sample_items(warm_n, f"{ctx.run_id}-warm", seed=seed, distinct=True), "warm-up")
    best_embed = best_e2e = best_busy = 0.0
    per_round = []
    for r in range(rounds):
        items = sample_items(items_n, f"{ctx.run_id}-r{r}", seed=seed, distinct=True, start=warm_n + r * items_n)
        embed = await loop.run_in_executor(None, embedder_throughput, [i.text for i in items], batch_size)
        before, t0 = _embedding_seconds(metrics_port), time.monotonic()
        e2e, busy = await _burst(ctx, items, f"round {r + 1}")
        after, wall = _embedding_seconds(metrics_port), time.monotonic() - t0
        # Measured inside the worker during the burst itself, so the machine's load moves both sides alike.
        share = round((after - before) / wall, 3) if before is not None and after is not None else None
        per_round.append({"embedder_per_s": round(embed, 1), "triage_per_s": round(e2e, 1),
                          "ratio": round(e2e / embed, 3), "triage_busy_per_s": round(busy, 1) if busy else None,
                          "busy_ratio": round(busy / embed, 3) if busy else None,
                          "worker_embedding_share": share, "load_average": load_average()})
        best_embed, best_e2e, best_busy = max(best_embed, embed), max(best_e2e, e2e), max(best_busy, busy or 0.0)
        console.print(f"  round {r + 1}/{rounds}: embedder alone {embed:.1f} texts/s, triage end to end "
                      f"{e2e:.1f} items/s (ratio {e2e / embed:.3f}; while busy {busy or 0:.1f}/s; the worker "
                      f"embedded {share if share is not None else '-'} of the burst)")
    shares = [r["worker_embedding_share"] for r in per_round if r["worker_embedding_share"] is not None]
    return {"embedder_per_s": round(best_embed, 1), "triage_per_s": round(best_e2e, 1),
            "ratio": round(best_e2e / best_embed, 3), "triage_busy_per_s": round(best_busy, 1),
            "busy_ratio": round(best_busy / best_embed, 3),
            "worker_embedding_share": max(shares) if shares else None, "rounds": per_round}


async def run_spine_bench(throughput_items: int, steady_rate: float, steady_seconds: float, json_out: Path | None,
                          state_dir: Path, console: Console, rounds: int = 2) -> dict:
    load_before = load_average()
    from pipeline.stack import free_port

    port = free_port()
    async with pipeline_running(state_dir, console, "spine-triage", fresh_keyspace=True, roles=[Role.TRIAGE],
                                worker_env={"MODPIPE_WORKER__METRICS_PORT": str(port)}) as ctx:
        console.print(f"[bold]triage alone[/]: {rounds} rounds of {throughput_items} texts, embedder alone then the "
                      "same texts through Kafka")
        alone = await _rounds(ctx, throughput_items, rounds, 7, console, warm_n=min(200, throughput_items),
                              metrics_port=port)
    async with pipeline_running(state_dir, console, "spine", fresh_keyspace=True) as ctx:
        console.print("[bold]with every role[/]: the same measurement once, the reasoner on the same cores")
        shared = await _rounds(ctx, throughput_items, 1, 17, console, warm_n=min(100, throughput_items))
        # Let the reasoner drain the burst's escalations, so the steady phase measures steady state, not backlog.
        await ctx.observer.wait_settled([c for c in ctx.observer.journeys], 0, 900)
        steady_n = int(steady_rate * steady_seconds)
        console.print(f"[bold]steady load[/]: {steady_n} items at {steady_rate:g}/s")
        steady = sample_items(steady_n, f"{ctx.run_id}-steady", seed=17, distinct=True,
                              start=min(100, throughput_items) + throughput_items)
        await publish_items(ctx, steady, steady_rate)
        steady_ids = [i.content_id for i in steady]
        settled = await ctx.observer.wait_settled(steady_ids, 0, 600)
        latency = stage_latencies(ctx.observer, steady_ids)
    report = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "command": f"modpipe bench spine --items {throughput_items} --rounds {rounds} --rate {steady_rate:g} "
                   f"--seconds {steady_seconds:g}",
        "items_per_round": throughput_items,
        "triage_alone": alone,
        "every_role": shared,
        # The names earlier reports used, for scripts that read them.
        "embedder_per_s": alone["embedder_per_s"],
        "pipeline_triage_per_s": alone["triage_per_s"],
        "pipeline_to_embedder_ratio": alone["ratio"],
        "steady_rate_per_s": steady_rate,
        "steady_items": steady_n,
        "steady_settled": settled,
        "latency_ms": latency,
    }
    write_json(json_out, report)
    _write_markdown(report)
    console.print_json(data=report)
    return report


def _fmt(value: object) -> str:
    return "-" if value is None else str(value)


def _write_markdown(report: dict) -> None:
    """Replace the spine section of docs/BENCHMARKS.md, keeping every other section."""
    begin, end = markers("spine")
    alone, shared, lat = report["triage_alone"], report["every_role"], report["latency_ms"]
    rounds = "; ".join(f"{r['embedder_per_s']} / {r['triage_per_s']} ({r['ratio']}; embedding share "
                       f"{r['worker_embedding_share']}; load {r['load_average']})" for r in alone["rounds"])
    rows = "\n".join(f"| {stage} verdict latency p50 / p95 / p99 ({v['items']} items) | {_fmt(v['p50'])} / "
                     f"{_fmt(v['p95'])} / {_fmt(v['p99'])} ms |" for stage, v in lat.items())
    body = f"""{begin}
## Spine: triage throughput and verdict latency (`modpipe bench spine`)

`{report['command']}` on {report['machine']} ({report['measured_at']}; load average
{report['load_average_before']} before, {report['load_average_after']} after: shared with other work, so trust the
ratios, measured on the same texts seconds apart, more than the absolute numbers). Local stack (Tansu memory
broker, Redis, Triton with the CPU stand-in reasoner); every phase in a fresh keyspace.

| measure | value |
|---|---|
| embedder alone (the triage worker's scoring path, same batch size, best of {len(alone['rounds'])} rounds) | {alone['embedder_per_s']} texts/s |
| triage stage end to end, triage worker alone (Kafka in, verdict out, same texts, burst) | {alone['triage_per_s']} items/s |
| **ratio triage end to end / embedder** | **{alone['ratio']}** (target 0.8) |
| the stage while busy (first to last triage verdict of the burst), and its ratio | {alone['triage_busy_per_s']} items/s ({alone['busy_ratio']}) |
| share of the burst the triage worker spent embedding and scoring (its own `modpipe_triage_latency_seconds`, best round) | {alone['worker_embedding_share']} |
| rounds: embedder / end to end (ratio, load average) | {rounds} |
| the same with every role on the same cores (reasoner and stand-in busy with the burst's escalations) | {shared['embedder_per_s']} / {shared['triage_per_s']} ({shared['ratio']}) |
| steady load, every role | {report['steady_items']} items at {report['steady_rate_per_s']}/s (settled: {report['steady_settled']}) |
{rows}

Latency is from the item's broker timestamp on `content.incoming` to the verdict's `decided_at` (settle: the final
verdict or the review task; reasoning: escalated items only).
{end}"""
    replace_section("spine", body)
