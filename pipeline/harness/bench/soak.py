"""``modpipe bench soak``: the pipeline at a steady rate for minutes, watched per worker and per minute.

Every ``sample_s`` it reads each worker process's resident memory and open sockets from ``/proc`` and each role's
consumer lag from the broker; per minute it reports what was published and settled and the final-verdict latency
of the items settled in that minute. Memory growth is measured after the warm-up minute (caches fill, the
embedder and the gRPC channels come up in the first minute): the largest RSS in the last minute against the
largest in the first, per worker; the target is under 10 %. The plot and the per-minute table go to the Soak
section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline.app import Role, group_id, role_topic
from pipeline.broker import group_lag
from pipeline.config import PROJECT_ROOT
from pipeline.errors import RetryableError
from pipeline.harness.bench.docs import markers, replace_section
from pipeline.harness.demo import RunContext, pipeline_running, publish_items
from pipeline.harness.traffic import sample_items
from pipeline.host import machine_summary
from pipeline.reports import percentile, write_json

PLOT = PROJECT_ROOT / "docs" / "soak.png"
GROWTH_TARGET = 0.10


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def open_sockets(pid: int) -> int | None:
    try:
        return sum(1 for fd in os.scandir(f"/proc/{pid}/fd") if os.readlink(fd.path).startswith("socket:"))
    except OSError:
        return None


async def _sample(ctx: RunContext, t0: float, samples: list[dict]) -> None:
    lags: dict[str, int | None] = {}
    for role in Role:
        try:
            found = await group_lag(ctx.settings.kafka, group_id(ctx.settings, role), role_topic(ctx.settings, role))
            lags[role.value] = sum(x.lag for x in found)
        except RetryableError:
            lags[role.value] = None
    for role, procs in list(ctx.workers.procs.items()):
        for i, proc in enumerate(list(procs)):
            samples.append({"t": round(time.monotonic() - t0, 1), "worker": f"{role.value}-{i}", "pid": proc.pid,
                            "rss_mb": rss_mb(proc.pid), "sockets": open_sockets(proc.pid), "lag": lags[role.value]})


async def run_soak(rate: float, minutes: float, json_out: Path | None, state_dir: Path, console: Console,
                   sample_s: float = 10.0, drain_timeout_s: float = 600.0, write_docs: bool = True) -> dict:
    keyspace = f"modpipe-soak-{uuid.uuid4().hex[:8]}:"
    samples: list[dict] = []
    async with pipeline_running(state_dir, console, "soak", redis_key_prefix=keyspace) as ctx:
        items = sample_items(int(rate * minutes * 60), ctx.run_id, seed=11, distinct=True)
        published_at: dict[str, float] = {}
        console.print(f"[bold]soak[/]: {len(items)} items at {rate:g}/s for {minutes:g} min")
        t0 = time.monotonic()

        async def sampler() -> None:
            while True:
                await _sample(ctx, t0, samples)
                await asyncio.sleep(sample_s)

        sampling = asyncio.create_task(sampler())
        try:
            interval = 1.0 / rate
            for i, item in enumerate(items):
                delay = t0 + i * interval - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                published_at[item.content_id] = time.monotonic() - t0
                await publish_items(ctx, [item], 0)
            publish_end = time.monotonic() - t0
            ids = [i.content_id for i in items]
            settled = await ctx.observer.wait_settled(ids, 0, drain_timeout_s)
            drained_at = time.monotonic() - t0
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
        arrivals = {cid: t - t0 for t, cid, _ in reversed(ctx.observer.arrivals)}  # first arrival wins
        finals = {cid: j.finals[0] for cid, j in ctx.observer.journeys.items() if j.finals}
        restarts = dict(ctx.workers.restarts)
    per_minute = []
    for minute in range(int((drained_at + 59) // 60)):
        lo, hi = minute * 60, (minute + 1) * 60
        done = [cid for cid, t in arrivals.items() if lo <= t < hi]
        latency = [finals[c].latency.since_ingest_ms for c in done if c in finals
                   and finals[c].latency.since_ingest_ms is not None]
        window = [s for s in samples if lo <= s["t"] < hi]
        per_minute.append({
            "minute": minute + 1,
            "published": sum(1 for t in published_at.values() if lo <= t < hi),
            "settled": len(done),
            "final_p50_ms": percentile(latency, 50),
            "final_p99_ms": percentile(latency, 99),
            "max_lag": {w: max((s["lag"] or 0) for s in window if s["worker"].startswith(w)) if window else None
                        for w in (r.value for r in Role)},
            "rss_mb": {w: max((s["rss_mb"] or 0) for s in window if s["worker"] == w)
                       for w in sorted({s["worker"] for s in window})},
            "sockets": {w: max((s["sockets"] or 0) for s in window if s["worker"] == w)
                        for w in sorted({s["worker"] for s in window})},
        })
    growth = _growth(samples, publish_end)
    report = {
        "rate_per_s": rate, "minutes": minutes, "items": len(items), "settled": settled,
        "publish_s": round(publish_end, 1), "drained_s": round(drained_at, 1),
        "drain_after_publishing_s": round(drained_at - publish_end, 1),
        "rss_growth_after_warmup": growth,
        "growth_target": GROWTH_TARGET,
        "memory_ok": all(g is not None and g < GROWTH_TARGET for g in growth.values()),
        "worker_restarts": restarts,
        "per_minute": per_minute,
        "samples": samples,
        "machine": machine_summary(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _plot(samples, per_minute, PLOT)
    write_json(json_out, report)
    if write_docs:
        replace_section("soak", _section(report))
    _print(console, report)
    return report


def _growth(samples: list[dict], publish_end: float) -> dict[str, float | None]:
    """Per worker: largest RSS in the last minute of publishing over the largest in the first minute, minus 1."""
    out: dict[str, float | None] = {}
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        if s["rss_mb"]:
            by_worker[s["worker"]].append(s)
    for worker, rows in by_worker.items():
        first = [r["rss_mb"] for r in rows if r["t"] < 60]
        last = [r["rss_mb"] for r in rows if publish_end - 60 <= r["t"] <= publish_end + 1]
        out[worker] = round(max(last) / max(first) - 1, 4) if first and last and publish_end > 120 else None
    return out


def _plot(samples: list[dict], per_minute: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_lag, ax_lat) = plt.subplots(3, 1, figsize=(8, 9), sharex=False)
    for worker in sorted({s["worker"] for s in samples}):
        rows = [s for s in samples if s["worker"] == worker and s["rss_mb"]]
        ax_rss.plot([r["t"] / 60 for r in rows], [r["rss_mb"] for r in rows], label=worker)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_title("worker memory")
    ax_rss.legend(fontsize=8)
    for role in (r.value for r in Role):
        rows = [s for s in samples if s["worker"] == f"{role}-0" and s["lag"] is not None]
        ax_lag.plot([r["t"] / 60 for r in rows], [r["lag"] for r in rows], label=role)
    ax_lag.set_ylabel("consumer lag (messages)")
    ax_lag.legend(fontsize=8)
    minutes = [m["minute"] for m in per_minute]
    ax_lat.plot(minutes, [(m["final_p50_ms"] or 0) / 1000 for m in per_minute], marker="o", label="p50")
    ax_lat.plot(minutes, [(m["final_p99_ms"] or 0) / 1000 for m in per_minute], marker="o", label="p99")
    ax_lat.set_ylabel("final verdict latency (s)")
    ax_lat.set_xlabel("minute")
    ax_lat.legend(fontsize=8)
    for ax in (ax_rss, ax_lag):
        ax.set_xlabel("minute")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: float | None, scale: float = 1.0) -> str:
    return "-" if value is None else f"{value / scale:.1f}"


def _section(report: dict) -> str:
    begin, end = markers("soak")
    rows = "\n".join(
        f"| {m['minute']} | {m['published']} | {m['settled']} | {_fmt(m['final_p50_ms'], 1000)} | "
        f"{_fmt(m['final_p99_ms'], 1000)} | {' / '.join(str(m['max_lag'][r.value]) for r in Role)} | "
        f"{' / '.join(f'{v:.0f}' for v in m['rss_mb'].values())} | {' / '.join(str(v) for v in m['sockets'].values())} |"
        for m in report["per_minute"]
    )
    workers = " / ".join(report["per_minute"][0]["rss_mb"]) if report["per_minute"] else ""
    growth = ", ".join(f"{w} {'-' if g is None else f'{g * 100:+.1f} %'}" for w, g in
                       report["rss_growth_after_warmup"].items())
    return f"""{begin}
## Soak: steady load for minutes (`modpipe bench soak`)

`modpipe bench soak --rate {report['rate_per_s']:g} --minutes {report['minutes']:g}` on {report['machine']}
({report['measured_at']}): one worker per role, the CPU stand-in reasoner on Triton, distinct texts (no cache
hits), a fresh Redis keyspace. {report['items']} items published in {report['publish_s']} s; everything settled
{report['drain_after_publishing_s']} s after publishing stopped (settled: {report['settled']}). Worker restarts:
{report['worker_restarts'] or 'none'}.

Memory growth after the warm-up minute (largest RSS in the last minute of publishing over the first): {growth}
(target under {report['growth_target'] * 100:.0f} %: {'met' if report['memory_ok'] else '**not met**'}).

![soak: worker RSS, consumer lag per role, final-verdict latency per minute](soak.png)

| minute | published | settled | final p50 (s) | final p99 (s) | max lag triage / reasoning / review-intake | RSS MiB ({workers}) | sockets |
|---|---|---|---|---|---|---|---|
{rows}
{end}"""


def _print(console: Console, report: dict) -> None:
    console.print(f"soak: {report['items']} items, settled={report['settled']}, drained "
                  f"{report['drain_after_publishing_s']} s after publishing; RSS growth after warm-up "
                  f"{report['rss_growth_after_warmup']} (memory ok: {report['memory_ok']})")
    for m in report["per_minute"]:
        console.print(f"  minute {m['minute']}: published {m['published']} settled {m['settled']} final p99 "
                      f"{_fmt(m['final_p99_ms'], 1000)} s lag {m['max_lag']} rss {m['rss_mb']} sockets {m['sockets']}")
