"""``modpipe bench stress``: a steady offered load through the whole pipeline, and a gate on what came out.

Like ROOST Osprey's stress CLI: it publishes ``rate`` items per second for ``seconds`` (the project's sample
traffic, made distinct so no cache serves a repeat) through every worker role on the local stack, in a keyspace
of this run only (fresh topics, consumer groups and Redis keys: first-run numbers), after a short warm-up outside
the sample. Then it reports:

- the drop rate: items with neither a final verdict, nor a review task, nor a dead letter ``deadline_s`` after
  publishing ended (what a platform never heard back about);
- p50/p95/p99 latency per stage (:func:`pipeline.harness.journey.stage_latencies`: triage, reasoning, settle);
- consumer lag per role over time (sampled every ``sample_s``) and its maximum;
- what 1,000 items cost: escalated, sent to review, reasoner calls, input and output tokens;

and whether the gate held: drop rate at most ``max_drop_rate`` and the p95 of ``p95_stage`` at most
``max_p95_ms``. ``modpipe bench stress`` exits 2 on a breach, so CI fails a change that costs capacity
(``tests/e2e/test_stress_gate.py`` runs it at a rate this machine carries).
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pipeline.app import Role
from pipeline.harness.bench.docs import markers, replace_section
from pipeline.harness.demo import pipeline_running, publish_items
from pipeline.harness.journey import stage_latencies, summarise
from pipeline.harness.load import LagSampler, dropped, load_average
from pipeline.harness.traffic import sample_items
from pipeline.host import machine_summary
from pipeline.reports import write_json

STAGES = ("triage", "reasoning", "settle")


async def run_stress(rate: float, seconds: float, *, max_drop_rate: float, max_p95_ms: float, p95_stage: str,
                     deadline_s: float, sample_s: float, warmup_items: int, json_out: Path | None, state_dir: Path,
                     console: Console, write_docs: bool = False) -> dict[str, Any]:
    if p95_stage not in STAGES:
        raise ValueError(f"p95 stage must be one of {', '.join(STAGES)}")
    n = max(1, int(round(rate * seconds)))
    load_before = load_average()
    async with pipeline_running(state_dir, console, "stress", fresh_keyspace=True) as ctx:
        if warmup_items:
            # Connections, the embedder's threads and the stand-in's policy indexes come up outside the sample.
            warm = sample_items(warmup_items, f"{ctx.run_id}-warm", seed=99, distinct=True)
            await publish_items(ctx, warm, rate)
            await ctx.observer.wait_settled([i.content_id for i in warm], 0, 120)
        items = sample_items(n, ctx.run_id, seed=99, distinct=True, start=warmup_items)  # never a warm-up's text
        ids = [i.content_id for i in items]
        console.print(f"[bold]stress[/]: {n} items at {rate:g}/s for {seconds:g} s (gate: drop rate <= "
                      f"{max_drop_rate:g}, {p95_stage} p95 <= {max_p95_ms:g} ms)")
        async with LagSampler(ctx.settings, list(Role), sample_s) as lag:
            t0 = time.monotonic()
            await publish_items(ctx, items, rate)
            publish_s = time.monotonic() - t0
            settled = await ctx.observer.wait_settled(ids, 0, deadline_s)
            drained_s = time.monotonic() - t0
        missing = dropped(ctx.observer, ids)
        latency = stage_latencies(ctx.observer, ids)
        summary = summarise(ctx.observer, ids, n)
        keyspace = ctx.keyspace
    drop_rate = len(missing) / n
    measured_p95 = latency[p95_stage]["p95"]
    breaches = []
    if drop_rate > max_drop_rate:
        breaches.append(f"drop rate {drop_rate:.4f} > {max_drop_rate:g} ({len(missing)} of {n} items unsettled "
                        f"{deadline_s:g} s after publishing)")
    if measured_p95 is None or measured_p95 > max_p95_ms:
        breaches.append(f"{p95_stage} p95 {measured_p95} ms > {max_p95_ms:g} ms")
    report: dict[str, Any] = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "command": f"modpipe bench stress --rate {rate:g} --seconds {seconds:g} --max-drop-rate {max_drop_rate:g} "
                   f"--max-p95-ms {max_p95_ms:g} --p95-stage {p95_stage}",
        "keyspace": keyspace,
        "caches": "cold (fresh topics and Redis keys; distinct texts)",
        "offered_rate_per_s": rate,
        "seconds": seconds,
        "items": n,
        "warmup_items": warmup_items,
        "publish_s": round(publish_s, 2),
        "achieved_publish_rate_per_s": round(n / publish_s, 1) if publish_s else None,
        "settled_within_deadline": settled,
        "drained_s": round(drained_s, 2),
        "deadline_s": deadline_s,
        "dropped": len(missing),
        "dropped_ids": missing[:20],
        "drop_rate": round(drop_rate, 4),
        "latency_ms": latency,
        "max_lag": lag.max_lag(),
        "lag": lag.samples,
        "duplicate_final_verdicts": summary["duplicate_final_verdicts"],
        "dead_letters": summary["dead_letters"],
        "escalation_rate": summary["escalation_rate"],
        "routes": summary["routes"],
        "per_1000_items": summary["per_1000_items"],
        "reasoner": summary["reasoner"],
        "gate": {"max_drop_rate": max_drop_rate, "max_p95_ms": max_p95_ms, "p95_stage": p95_stage,
                 "passed": not breaches, "breaches": breaches},
    }
    write_json(json_out, report)
    if write_docs:
        replace_section("stress", render_section(report))
    print_stress(console, report)
    return report


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:,.1f}" if isinstance(value, float) else f"{value}"


def print_stress(console: Console, report: dict[str, Any]) -> None:
    table = Table(title=f"modpipe bench stress: {report['items']} items at {report['offered_rate_per_s']:g}/s "
                        f"({report['caches']})")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("published in", f"{report['publish_s']} s ({report['achieved_publish_rate_per_s']}/s)")
    table.add_row("dropped", f"{report['dropped']} ({report['drop_rate'] * 100:.2f} %)")
    for stage, values in report["latency_ms"].items():
        table.add_row(f"{stage} p50 / p95 / p99 (ms, {values['items']} items)",
                      " / ".join(_fmt(values[q]) for q in ("p50", "p95", "p99")))
    table.add_row("max consumer lag " + " / ".join(report["max_lag"]), " / ".join(
        _fmt(v) for v in report["max_lag"].values()))
    per = report["per_1000_items"]
    table.add_row("per 1,000 items: escalated / to review", f"{per['escalated']} / {per['sent_to_review']}")
    table.add_row("per 1,000 items: reasoner calls / input / output tokens",
                  f"{per['reasoner_calls']} / {per['input_tokens']:,} / {per['output_tokens']:,}")
    table.add_row("load average (1, 5, 15 min) before / after",
                  f"{report['load_average_before']} / {report['load_average_after']}")
    gate = report["gate"]
    table.add_row("gate", "[green]held[/]" if gate["passed"] else "[red]BREACHED[/]: " + "; ".join(gate["breaches"]))
    console.print(table)


def render_section(r: dict[str, Any]) -> str:
    begin, end = markers("stress")
    lat = r["latency_ms"]
    rows = "\n".join(f"| {stage} | {v['items']} | {_fmt(v['p50'])} | {_fmt(v['p95'])} | {_fmt(v['p99'])} |"
                     for stage, v in lat.items())
    per = r["per_1000_items"]
    lag = " / ".join(f"{role} {_fmt(v)}" for role, v in r["max_lag"].items())
    gate = r["gate"]
    return f"""{begin}
## Stress gate (`modpipe bench stress`)

`{r['command']}` on {r['machine']} ({r['measured_at']}; load average {r['load_average_before']} before,
{r['load_average_after']} after, shared with other work): {r['items']} items of the sample traffic (distinct
texts) through one worker per role and the CPU stand-in reasoner, in a fresh keyspace, after
{r['warmup_items']} warm-up items. Published at {r['achieved_publish_rate_per_s']}/s; everything that settled did
so {r['drained_s']} s after the first item. Gate: **{'held' if gate['passed'] else 'breached'}**
({'; '.join(gate['breaches']) or 'drop rate and p95 within the bars'}).

| stage | items | p50 (ms) | p95 (ms) | p99 (ms) |
|---|---|---|---|---|
{rows}

Dropped (no final verdict, review task or dead letter {r['deadline_s']:g} s after publishing): {r['dropped']}
({r['drop_rate'] * 100:.2f} %). Largest consumer lag: {lag}. Per 1,000 items: {per['escalated']} escalated,
{per['sent_to_review']} sent to review, {per['reasoner_calls']} reasoner calls, {per['input_tokens']:,} input and
{per['output_tokens']:,} output tokens (the stand-in's token counts; a real model's analysis is longer).
{end}"""
