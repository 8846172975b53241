"""``modpipe bench reasoner``: the reasoning stage against a Triton model that sleeps a fixed time per call.

What it answers: does the stage keep calls in flight (a 200 ms model at concurrency 32 allows 160 items/s; a
stage that serialised calls would do 5), and do repeated texts really cost no model call? It starts its own
Triton (serving a copy of ``triton_repo/bench/sleep_reasoner_bench`` with the requested latency) and a private
Redis for the verdict cache, judges ``items`` items with ``concurrency`` workers through the real
:class:`~pipeline.reasoner.SafeguardReasoner` (gRPC stream_infer, semaphore, circuit breaker, cache), and writes
``items_per_s`` and ``cache_hit_rate_on_duplicates`` to a JSON file and to docs/BENCHMARKS.md.

A fraction of the items (``duplicates``) repeat an earlier text (sometimes with different spacing, which the
cache normalises away); an item is "served from the cache" when its call was marked ``cached`` (a Redis hit, or
joined to the identical call already in flight).
"""

from __future__ import annotations

import asyncio
import random
import re
import shutil
import statistics
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from pipeline.host import machine_summary
from pipeline.harness.bench.docs import BENCHMARKS_MD, markers, replace_section
from pipeline.config import PROJECT_ROOT, RedisSettings, ReasonerSettings, TritonSettings
from pipeline.reports import percentile
from pipeline.schemas import ContentItem, Effort

BENCH_MODEL = "sleep_reasoner_bench"
BENCH_MODEL_DIR = PROJECT_ROOT / "triton_repo" / "bench" / BENCH_MODEL
BEGIN, END = markers("reasoner")
BENCH_POLICY = "violence"  # not high-risk: one call per item at the first effort


def prepare_repo(root: Path, latency_ms: float) -> Path:
    """A model repository holding only the bench model, with ``latency_ms`` written into its config."""
    repo = root / "bench_repo"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(BENCH_MODEL_DIR, repo / BENCH_MODEL, ignore=shutil.ignore_patterns("__pycache__"))
    config = repo / BENCH_MODEL / "config.pbtxt"
    text, n = re.subn(
        r'(key: "latency_ms"\s*value: \{ string_value: ")[^"]*(")', rf"\g<1>{latency_ms:g}\g<2>", config.read_text()
    )
    if n != 1:
        raise RuntimeError("bench model config has no latency_ms parameter")
    config.write_text(text)
    return repo


def make_items(n: int, duplicates: float, seed: int = 11) -> tuple[list[ContentItem], set[int]]:
    """``n`` items, a ``duplicates`` fraction of which repeat an earlier text; returns the duplicates' indexes."""
    rng = random.Random(seed)
    items: list[ContentItem] = []
    originals: list[str] = []
    dup_index: set[int] = set()
    for i in range(n):
        if originals and rng.random() < duplicates:
            text = rng.choice(originals)
            if rng.random() < 0.5:
                text = "  " + text.replace(" ", "  ") + "\n"  # same text to a reader: the cache normalises it
            dup_index.add(i)
        else:
            text = f"bench post {i}: {uuid.UUID(int=rng.getrandbits(128)).hex} is this allowed?"
            originals.append(text)
        items.append(ContentItem(content_id=f"bench-{i}", text=text))
    return items, dup_index


async def _measure(grpc_url: str, redis_url: str, concurrency: int, items: list[ContentItem], dup_index: set[int],
                   latency_ms: float) -> dict:
    from pipeline.policies import PolicyLibrary
    from pipeline.reasoner.core import SafeguardReasoner
    from pipeline.reasoner.cache import RedisVerdictCache

    library = PolicyLibrary.load(PROJECT_ROOT / "policies")
    triton = TritonSettings(
        grpc_url=grpc_url, reasoner_model=BENCH_MODEL, max_in_flight=concurrency, request_timeout_s=30.0
    )
    settings = ReasonerSettings()
    cache = RedisVerdictCache(RedisSettings(url=redis_url, key_prefix=f"bench{uuid.uuid4().hex[:8]}:"),
                              settings.cache_ttl_s)
    reasoner = SafeguardReasoner(triton, settings, library, cache=cache)
    async with reasoner:
        warm = [ContentItem(content_id=f"warm-{i}", text=f"warm-up {uuid.uuid4().hex}") for i in range(concurrency)]
        await asyncio.gather(*(reasoner.judge(w, [BENCH_POLICY]) for w in warm))  # channel and stub warm
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in range(len(items)):
            queue.put_nowait(i)
        outcomes: dict[int, object] = {}
        latencies: list[float] = []

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                t0 = time.perf_counter()
                outcomes[i] = await reasoner.judge(items[i], [BENCH_POLICY])
                latencies.append((time.perf_counter() - t0) * 1000)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    calls = [c for o in outcomes.values() for c in o.calls]  # type: ignore[attr-defined]
    dup_cached = sum(all(c.cached for c in outcomes[i].calls) for i in dup_index)  # type: ignore[attr-defined]
    latencies.sort()
    made = [c for c in calls if not c.cached]
    input_tokens = sum(c.prompt_tokens or 0 for c in made)
    output_tokens = sum(c.completion_tokens or 0 for c in made)
    per_1000 = 1000 / len(items) if items else 0.0
    return {
        "items": len(items),
        "concurrency": concurrency,
        "latency_ms": latency_ms,
        "wall_s": round(wall, 3),
        "items_per_s": round(len(items) / wall, 1),
        "ceiling_items_per_s": round(concurrency * 1000 / latency_ms, 1) if latency_ms else None,
        "model_calls": sum(not c.cached for c in calls),
        "model_calls_per_s": round(sum(not c.cached for c in calls) / wall, 1),
        "errors": sum(c.error is not None for c in calls),
        "duplicates": len(dup_index),
        "duplicates_served_from_cache": dup_cached,
        "cache_hit_rate_on_duplicates": round(dup_cached / len(dup_index), 4) if dup_index else None,
        "item_latency_ms_p50": percentile(latencies, 50),
        "item_latency_ms_p95": percentile(latencies, 95),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "tokens_from_backend": bool(made) and all(c.tokens_from_backend for c in made),
        "per_1000_items": {
            "model_calls": round(len(made) * per_1000, 1),
            "input_tokens": round(input_tokens * per_1000),
            "output_tokens": round(output_tokens * per_1000),
        },
    }


async def run_reasoner_bench(latency_ms: float, concurrency: int, n_items: int, duplicates: float,
                             json_out: Path | None, state_dir: Path, console: Console, *, write_docs: bool = True,
                             ) -> dict:
    from pipeline.reports import write_json
    from pipeline.stack import stack_down, stack_up

    bench_dir = Path(state_dir) / "bench-reasoner"
    bench_dir.mkdir(parents=True, exist_ok=True)
    repo = prepare_repo(bench_dir, latency_ms)
    console.print(f"starting Triton with {BENCH_MODEL} ({latency_ms:g} ms per call) and a private Redis ...")
    loop = asyncio.get_running_loop()
    info = await loop.run_in_executor(None, lambda: stack_up(bench_dir / "stack", triton_repo=repo,
                                                             private_redis=True, timeout_s=180))
    try:
        items, dup_index = make_items(n_items, duplicates)
        console.print(f"judging {n_items} items ({len(dup_index)} duplicates) with {concurrency} workers ...")
        report = await _measure(info.triton_grpc, info.redis_url, concurrency, items, dup_index, latency_ms)
    finally:
        await loop.run_in_executor(None, stack_down, info.state_dir)
    report.update({
        "policy": BENCH_POLICY,
        "model": BENCH_MODEL,
        "machine": machine_summary(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"modpipe bench reasoner --latency-ms {latency_ms:g} --concurrency {concurrency} "
                   f"--items {n_items} --duplicates {duplicates:g}",
    })
    console.print_json(data=report)
    if json_out is not None:
        write_json(json_out, report)
    if write_docs:
        write_benchmarks_section(report)
    return report



def render_section(r: dict) -> str:
    return "\n".join([
        BEGIN,
        "## Reasoner",
        "",
        f"`{r['command']}` ({r['measured_at']}, {r['machine']}): the reasoning stage (real client: gRPC stream_infer,",
        f"in-flight semaphore, circuit breaker, Redis verdict cache) against `{r['model']}`, a Triton python-backend",
        "model that answers every call after a fixed sleep, so the numbers measure the stage, not a model.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| items/s | **{r['items_per_s']}** (model-call ceiling {r['ceiling_items_per_s']}/s = concurrency / latency; "
        "cached duplicates come on top) |",
        f"| cache hit rate on duplicates | **{r['cache_hit_rate_on_duplicates']}** "
        f"({r['duplicates_served_from_cache']} of {r['duplicates']}) |",
        f"| model calls for {r['items']} items | {r['model_calls']} ({r['model_calls_per_s']}/s; every item is one call "
        "at low effort, a duplicate is none) |",
        f"| item latency p50 / p95 | {r['item_latency_ms_p50']} / {r['item_latency_ms_p95']} ms |",
        f"| per 1,000 items | {r['per_1000_items']['model_calls']} model calls, "
        f"{r['per_1000_items']['input_tokens']:,} input and {r['per_1000_items']['output_tokens']:,} output tokens "
        f"({'the backend' if r['tokens_from_backend'] else 'counted by the client'}; the bench model's answers are "
        "short, a real model's analysis is not) |",
        f"| errors | {r['errors']} |",
        "",
        "Target: at least 100 items/s at 200 ms and concurrency 32, every duplicate served from the cache.",
        END,
    ])


def write_benchmarks_section(report: dict, path: Path = BENCHMARKS_MD) -> None:
    """Replace the reasoner section between its markers (appending it when absent); other sections untouched."""
    replace_section("reasoner", render_section(report), path)


# -- the CPU stand-in's own cost per call ------------------------------------------------------------------------

STANDIN_POLICIES = ("violence", "hate", "harassment", "self_harm")


async def _standin_latency(grpc_url: str, concurrency: int) -> dict:
    """Per-call latency of ``safeguard_standin_cpu`` (no cache, no escalation): posts it has not seen, so nothing
    is warm but each policy's index (built by a warm-up on other posts)."""
    import json as json_mod

    from pipeline.harness.traffic import SAMPLE_TRAFFIC
    from pipeline.policies import PolicyLibrary
    from pipeline.reasoner.backends.triton import HarmonyBackend, TritonGrpcTransport

    library = PolicyLibrary.load(PROJECT_ROOT / "policies")
    posts = [json_mod.loads(line)["text"] for line in SAMPLE_TRAFFIC.read_text().splitlines() if line.strip()]
    work = [(library.get(STANDIN_POLICIES[i % len(STANDIN_POLICIES)]), text) for i, text in enumerate(posts)]
    warm, low, high, parallel = work[:20], work[20:100], work[100:180], work[180:300]
    model = "safeguard_standin_cpu"
    transport = TritonGrpcTransport(TritonSettings(grpc_url=grpc_url, reasoner_model=model))
    backend = HarmonyBackend(transport, model, logprobs=ReasonerSettings().logprobs)
    budget = ReasonerSettings().max_tokens_low
    report: dict = {}
    async with asyncio.timeout(600):
        await backend.start()
        try:
            for i, (policy, text) in enumerate(warm):
                for effort in (Effort.LOW, Effort.HIGH):
                    await backend.complete(policy, text, effort, f"warm-{i}-{effort.value}", max_tokens=budget)
            for name, rows, effort in (("low", low, Effort.LOW), ("high", high, Effort.HIGH)):
                latencies = []
                for i, (policy, text) in enumerate(rows):
                    t0 = time.perf_counter()
                    await backend.complete(policy, text, effort, f"{name}-{i}", max_tokens=budget)
                    latencies.append((time.perf_counter() - t0) * 1000)
                latencies.sort()
                report[f"sequential_{name}"] = {"calls": len(latencies), "p50_ms": percentile(latencies, 50),
                                                "p95_ms": percentile(latencies, 95),
                                                "mean_ms": round(statistics.fmean(latencies), 1)}
            gate = asyncio.Semaphore(concurrency)

            async def bounded(i: int, policy, text: str) -> None:  # type: ignore[no-untyped-def]
                async with gate:
                    await backend.complete(policy, text, Effort.LOW, f"par-{i}", max_tokens=budget)

            t0 = time.perf_counter()
            await asyncio.gather(*(bounded(i, p, t) for i, (p, t) in enumerate(parallel)))
            report[f"concurrency_{concurrency}_calls_per_s"] = round(len(parallel) / (time.perf_counter() - t0), 1)
        finally:
            await backend.close()
    return report


def run_standin_bench(state_dir: Path, concurrency: int = 8) -> dict:
    """Start a private stack serving ``triton_repo/cpu`` and measure the stand-in per call (printed as JSON by
    ``python -m pipeline.harness.bench.reasoner --standin``)."""
    from pipeline.stack import stack_down, stack_up

    started = time.monotonic()
    info = stack_up(Path(state_dir) / "bench-standin", private_redis=True, timeout_s=300)
    ready_s = round(time.monotonic() - started, 1)
    try:
        report = asyncio.run(_standin_latency(info.triton_grpc, concurrency))
    finally:
        stack_down(info.state_dir)
    report.update({"stack_ready_s": ready_s, "machine": machine_summary(),
                   "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "command": "python -m pipeline.harness.bench.reasoner --standin"})
    return report


if __name__ == "__main__":
    import json
    import sys

    from pipeline.config import default_state_dir

    if sys.argv[1:] != ["--standin"]:
        raise SystemExit("usage: python -m pipeline.harness.bench.reasoner --standin")
    print(json.dumps(run_standin_bench(default_state_dir()), indent=2))
