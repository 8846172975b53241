"""``modpipe bench capacity``: the knee of every stage, found by stepping the offered load until p95 breaks the bar.

Five stages, each measured alone on one private stack (its own Tansu broker, Redis and Triton serving both the CPU
stand-in reasoner and the fixed-latency bench model), each in a fresh keyspace (topics, consumer groups and Redis
keys of that stage only: cold caches, first-run numbers), with only the workers the stage needs:

- ``triage``: the triage worker alone, fed the sample traffic on ``content.incoming``; latency to the triage verdict;
- ``reasoning-sleep``: the reasoning worker alone against ``sleep_reasoner_bench`` answering after ``sleep_ms``,
  fed escalations (one policy, one call each); latency to the final verdict: the stage itself, not a model;
- ``reasoning-standin``: the reasoning worker alone against the CPU stand-in, fed the escalations the triage model
  makes of the sample traffic (its policies and scores); latency to the final verdict or review task;
- ``review-intake``: the review-intake worker alone, fed review tasks; latency to the task being in the reviewers'
  queue in Redis;
- ``pipeline``: every role, the sample traffic; latency to the final verdict or review task (settle).

Each step offers ``rate`` items/s for ``step_s`` seconds (distinct texts, so no cache serves a repeat), then waits
up to ``grace_s`` for the step's items. A step holds when its p95 is at most ``max_p95_ms`` and at most 1 % of its
items are unfinished after the grace; the next step multiplies the rate by ``factor``; a stage stops at its first
step that does not hold. The knee is the highest offered rate that held (the true knee lies between it and the
next step). Throughput is the step's finished items over the time from its first send to its last finish.

Everything runs on the same machine as the bench itself (publisher and observer share the cores), so on a small
shared machine the absolute numbers move with the load (recorded with each step); the shape and the order of the
knees are what to read.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline import stack as local_stack
from pipeline.app import Role
from pipeline.config import PROJECT_ROOT, Settings, stack_env_file
from pipeline.harness.bench.docs import markers, replace_section
from pipeline.harness.demo import RunContext, pipeline_running, publish_items
from pipeline.harness.load import load_average
from pipeline.harness.traffic import sample_items, sample_posts
from pipeline.host import machine_summary
from pipeline.reports import percentile, write_json
from pipeline.schemas import ContentItem, Escalation, EscalationReason, ReviewReason, ReviewTask, TriageScores, utcnow

PLOT = PROJECT_ROOT / "docs" / "capacity.png"
SLEEP_MODEL = "sleep_reasoner_bench"
STANDIN_MODEL = "safeguard_standin_cpu"
SLEEP_POLICY = "violence"  # not high-risk: one call per escalation at the first effort


@dataclass(frozen=True)
class StageSpec:
    name: str
    roles: tuple[Role, ...]
    start: float  # first offered rate, items/s
    what: str  # for the report: what is fed and what is timed
    worker_env: tuple[tuple[str, str], ...] = ()


STAGES: dict[str, StageSpec] = {s.name: s for s in (
    StageSpec("triage", (Role.TRIAGE,), 20.0, "content items; to the triage verdict"),
    StageSpec("reasoning-sleep", (Role.REASONING,), 20.0, "escalations (1 policy); to the final verdict",
              (("MODPIPE_TRITON__REASONER_MODEL", SLEEP_MODEL),)),
    StageSpec("reasoning-standin", (Role.REASONING,), 3.0,
              "the triage model's escalations of the sample traffic; to the final verdict or review task",
              (("MODPIPE_TRITON__REASONER_MODEL", STANDIN_MODEL),)),
    StageSpec("review-intake", (Role.REVIEW_INTAKE,), 25.0, "review tasks; to the task queued in Redis"),
    StageSpec("pipeline", tuple(Role), 6.0, "content items through every role; to the final verdict or review task",
              (("MODPIPE_TRITON__REASONER_MODEL", STANDIN_MODEL),)),
)}


class _Lazy:
    """Something :func:`publish_items` can send whose bytes are made at send time (an escalation's ``ingested_at``
    must be when it was sent, not when the step was planned)."""

    def __init__(self, content_id: str, build: Callable[[], bytes]) -> None:
        self.content_id = content_id
        self._build = build

    def to_bytes(self) -> bytes:
        return self._build()


def prepare_repo(root: Path, sleep_ms: float) -> Path:
    """A model repository with the CPU stand-in and the bench model (answering after ``sleep_ms``)."""
    repo = root / "capacity_repo"
    shutil.rmtree(repo, ignore_errors=True)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PROJECT_ROOT / "triton_repo" / "cpu" / STANDIN_MODEL, repo / STANDIN_MODEL, ignore=ignore)
    shutil.copytree(PROJECT_ROOT / "triton_repo" / "bench" / SLEEP_MODEL, repo / SLEEP_MODEL, ignore=ignore)
    config = repo / SLEEP_MODEL / "config.pbtxt"
    text, n = re.subn(r'(key: "latency_ms"\s*value: \{ string_value: ")[^"]*(")', rf"\g<1>{sleep_ms:g}\g<2>",
                      config.read_text())
    if n != 1:
        raise RuntimeError("bench model config has no latency_ms parameter")
    config.write_text(text)
    return repo


def triage_escalations(settings: Settings) -> list[tuple[str, TriageScores, EscalationReason, list[str]]]:
    """What the triage model escalates of the sample traffic: (text, scores, reason, policies) per escalated post."""
    from pipeline.policies import PolicyLibrary
    from pipeline.router import TriageRoute, route_triage
    from pipeline.triage import TriageModel

    library = PolicyLibrary.from_settings(settings.reasoner)
    model = TriageModel.load(settings.triage.model_dir, settings=settings.triage,
                             triton_grpc_url=settings.triton.grpc_url)
    texts = [post["text"] for post in sample_posts()]  # the whole pool, once
    out = []
    for text, scores in zip(texts, model.score(texts), strict=True):
        decision = route_triage(scores, model.thresholds, library.default_ids(),
                                language=getattr(scores, "language", None))
        if decision.route is TriageRoute.ESCALATE and decision.reason is not None:
            plain = TriageScores(model_version=scores.model_version, violation=scores.violation,
                                 categories=scores.categories, latency_ms=scores.latency_ms)
            out.append((text, plain, decision.reason, list(decision.policy_ids)))
    return out


_HANDLES = ("mika", "dantheman", "sunnydays", "kt", "oldmate", "pixelpaws", "jobakes", "northstar")


def _distinct(text: str, i: int, pool: int) -> str:
    lap = i // pool
    return f"@{_HANDLES[i % len(_HANDLES)]}{lap} {text}" if lap else text


class StageFeed:
    """The items one stage's steps publish (distinct across steps) and where."""

    def __init__(self, stage: str, ctx: RunContext, escalations: list) -> None:
        self.stage = stage
        self.ctx = ctx
        self.escalations = escalations
        self.offset = 0
        kafka = ctx.settings.kafka
        self.topic = kafka.topic({"triage": kafka.incoming_topic, "pipeline": kafka.incoming_topic,
                                  "review-intake": kafka.review_topic}.get(stage, kafka.escalations_topic))

    def items(self, n: int, tag: str) -> list[Any]:
        start, self.offset = self.offset, self.offset + n
        prefix = f"{self.ctx.run_id}-{tag}"
        if self.stage in ("triage", "pipeline"):
            # Texts continue where the last step stopped (replies past the pool's size): never a repeat.
            return sample_items(n, prefix, seed=31, distinct=True, start=start)
        out = []
        for i in range(start, start + n):
            cid = f"{prefix}-{i:06d}"
            out.append(_Lazy(cid, self._builder(cid, i)))
        return out

    def _builder(self, cid: str, i: int) -> Callable[[], bytes]:
        if self.stage == "reasoning-sleep":
            scores = TriageScores(model_version="capacity", violation=0.5, categories={"V": 0.5}, latency_ms=1.0)
            item = ContentItem(content_id=cid, text=f"capacity post {i}: {uuid.uuid4().hex} is this allowed?")
            return lambda: Escalation(item=item, triage=scores, reason=EscalationReason.AMBIGUOUS,
                                      policy_ids=[SLEEP_POLICY], ingested_at=utcnow()).to_bytes()
        text, scores, reason, policies = self.escalations[i % len(self.escalations)]
        item = ContentItem(content_id=cid, text=_distinct(text, i, len(self.escalations)), platform="capacity")
        if self.stage == "review-intake":
            return lambda: ReviewTask(task_id=uuid.uuid4().hex, item=item, triage=scores,
                                      reason=ReviewReason.EDGE_CASE, policy_ids=policies,
                                      ingested_at=utcnow()).to_bytes()
        return lambda: Escalation(item=item, triage=scores, reason=reason, policy_ids=policies,
                                  ingested_at=utcnow()).to_bytes()


async def _finished(stage: str, ctx: RunContext, ids: list[str], grace_s: float) -> dict[str, tuple[float, float]]:
    """Per finished id: (latency ms, finish wall time), waiting up to ``grace_s`` for the stage to finish them."""
    deadline = time.monotonic() + grace_s
    if stage == "review-intake":
        from pipeline.store import RedisStore
        from pipeline.store.keys import Namespace

        store = RedisStore(ctx.settings.redis)
        try:
            while True:
                pipe = store.redis.pipeline(transaction=False)
                for cid in ids:
                    pipe.hmget(store.key(Namespace.REVIEW_TASK, cid), "enqueued_at", "task")
                rows = await store.guard(pipe.execute())
                done = {cid: float(row[0]) for cid, row in zip(ids, rows) if row[0] is not None}
                if len(done) == len(ids) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
            sent = {cid: ReviewTask.model_validate_json(row[1]).ingested_at.timestamp()
                    for cid, row in zip(ids, rows) if row[0] is not None}
        finally:
            await store.close()
        return {cid: (max(0.0, (t - sent[cid]) * 1000.0), t) for cid, t in done.items()}
    observer = ctx.observer
    if stage == "triage":
        await observer.wait_triaged(ids, grace_s)
    else:
        await observer.wait_settled(ids, 0, grace_s)
    out: dict[str, tuple[float, float]] = {}
    for cid in ids:
        journey = observer.journeys.get(cid)
        if journey is None:
            continue
        if stage == "triage":
            verdict = next((v for v in journey.verdicts if v.stage.value == "triage"), None)
            if verdict is not None and verdict.latency.since_ingest_ms is not None:
                out[cid] = (verdict.latency.since_ingest_ms, verdict.decided_at.timestamp())
            continue
        if journey.finals:
            final = journey.finals[0]
            if final.latency.since_ingest_ms is not None:
                out[cid] = (final.latency.since_ingest_ms, final.decided_at.timestamp())
        elif journey.review_tasks:
            task = journey.review_tasks[0]
            out[cid] = ((task.created_at - task.ingested_at).total_seconds() * 1000.0, task.created_at.timestamp())
    return out


async def _step(feed: StageFeed, rate: float, step_s: float, grace_s: float, max_p95_ms: float,
                tag: str) -> dict[str, Any]:
    n = max(1, int(round(rate * step_s)))
    items = feed.items(n, tag)
    load = load_average()
    sent = await publish_items(feed.ctx, items, rate, topic=feed.topic)
    publish_s = time.time() - sent[0]
    done = await _finished(feed.stage, feed.ctx, [i.content_id for i in items], grace_s)
    latencies = [ms for ms, _ in done.values()]
    span = (max(t for _, t in done.values()) - sent[0]) if done else None
    unfinished = n - len(done)
    p95 = percentile(latencies, 95)
    held = unfinished <= 0.01 * n and p95 is not None and p95 <= max_p95_ms
    return {"offered_per_s": rate, "items": n, "publish_s": round(publish_s, 2), "finished": len(done),
            "unfinished": unfinished, "throughput_per_s": round(len(done) / span, 1) if span else None,
            "p50_ms": percentile(latencies, 50), "p95_ms": p95, "p99_ms": percentile(latencies, 99),
            "held": held, "load_average": load}


async def run_stage(spec: StageSpec, state_dir: Path, console: Console, *, escalations: list, step_s: float,
                    grace_s: float, factor: float, max_steps: int, max_p95_ms: float,
                    start: float | None = None) -> dict[str, Any]:
    rate = start or spec.start
    steps: list[dict[str, Any]] = []
    async with pipeline_running(state_dir, console, f"cap-{spec.name}", fresh_keyspace=True, roles=spec.roles,
                                worker_env=dict(spec.worker_env)) as ctx:
        feed = StageFeed(spec.name, ctx, escalations)
        # Connections, thread pools, the stand-in's policy indexes: up before the first measured step.
        await _step(feed, rate, min(step_s, 3.0), grace_s, float("inf"), "warm")
        for n in range(max_steps):
            step = await _step(feed, rate, step_s, grace_s, max_p95_ms, f"s{n}")
            steps.append(step)
            console.print(f"  {spec.name}: offered {rate:.1f}/s -> {step['throughput_per_s']}/s, p95 "
                          f"{step['p95_ms']} ms, unfinished {step['unfinished']}: "
                          + ("[green]held[/]" if step["held"] else "[red]broke the bar[/]"))
            if not step["held"]:
                break
            rate = round(rate * factor, 1)
        keyspace = ctx.keyspace
    held = [s for s in steps if s["held"]]
    knee = max((s["offered_per_s"] for s in held), default=None)
    return {"stage": spec.name, "what": spec.what, "roles": [r.value for r in spec.roles], "keyspace": keyspace,
            "steps": steps, "knee_per_s": knee,
            "knee_throughput_per_s": max((s["throughput_per_s"] or 0 for s in held), default=None),
            "broke_at_per_s": steps[-1]["offered_per_s"] if steps and not steps[-1]["held"] else None}


async def run_capacity(stages: list[str], *, step_s: float, grace_s: float, factor: float, max_steps: int,
                       max_p95_ms: float, sleep_ms: float, json_out: Path | None, state_dir: Path,
                       console: Console, write_docs: bool = True, starts: dict[str, float] | None = None,
                       ) -> dict[str, Any]:
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
    bench_dir = Path(state_dir) / "bench-capacity"
    stack_dir = bench_dir / "stack"
    repo = prepare_repo(bench_dir, sleep_ms)
    console.print(f"[bold]capacity[/]: a private stack (Tansu, Redis, Triton serving {STANDIN_MODEL} and {SLEEP_MODEL}"
                  f" at {sleep_ms:g} ms); stages {', '.join(stages)}")
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    load_before = load_average()
    await loop.run_in_executor(None, lambda: local_stack.stack_up(stack_dir, triton_repo=repo, private_redis=True,
                                                                  timeout_s=300))
    results = []
    try:
        needs_escalations = {"reasoning-standin", "review-intake"} & set(stages)
        escalations = (await loop.run_in_executor(None, triage_escalations, Settings(_env_file=stack_env_file(
            stack_dir))) if needs_escalations else [])
        for name in stages:
            console.print(f"[bold]{name}[/]: {STAGES[name].what}")
            results.append(await run_stage(STAGES[name], stack_dir, console, escalations=escalations, step_s=step_s,
                                           grace_s=grace_s, factor=factor, max_steps=max_steps,
                                           max_p95_ms=max_p95_ms, start=(starts or {}).get(name)))
    finally:
        await loop.run_in_executor(None, local_stack.stack_down, stack_dir)
    report: dict[str, Any] = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "command": f"modpipe bench capacity --stages {','.join(stages)} --step-s {step_s:g} --factor {factor:g} "
                   f"--max-p95-ms {max_p95_ms:g} --sleep-ms {sleep_ms:g}",
        "max_p95_ms": max_p95_ms,
        "max_unfinished": 0.01,
        "step_s": step_s,
        "grace_s": grace_s,
        "factor": factor,
        "sleep_ms": sleep_ms,
        "wall_s": round(time.monotonic() - started, 1),
        "stages": results,
    }
    write_json(json_out, report)
    plot(report, PLOT)
    if write_docs:
        replace_section("capacity", render_section(report))
    for r in results:
        console.print(f"{r['stage']}: knee {r['knee_per_s']}/s (throughput there {r['knee_throughput_per_s']}/s; "
                      f"broke at {r['broke_at_per_s']}/s)")
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_lat, ax_thr) = plt.subplots(1, 2, figsize=(11, 4.5))
    for stage in report["stages"]:
        steps = stage["steps"]
        if not steps:
            continue
        offered = [s["offered_per_s"] for s in steps]
        (line,) = ax_lat.plot(offered, [s["p95_ms"] or float("nan") for s in steps], marker="o", label=stage["stage"])
        ax_thr.plot(offered, [s["throughput_per_s"] or 0 for s in steps], marker="o", color=line.get_color(),
                    label=stage["stage"])
        if stage["knee_per_s"]:
            ax_lat.axvline(stage["knee_per_s"], color=line.get_color(), linestyle=":", linewidth=1)
    ax_lat.axhline(report["max_p95_ms"], color="grey", linestyle="--", linewidth=1, label="p95 bar")
    ax_lat.set(xscale="log", yscale="log", xlabel="offered load (items/s)", ylabel="p95 latency (ms)",
               title="latency against offered load (dotted: knee)")
    top = max((s["offered_per_s"] for st in report["stages"] for s in st["steps"]), default=1)
    ax_thr.plot([1, top], [1, top], color="grey", linestyle="--", linewidth=1, label="throughput = offered")
    ax_thr.set(xscale="log", yscale="log", xlabel="offered load (items/s)", ylabel="throughput (items/s)",
               title="throughput against offered load")
    for ax in (ax_lat, ax_thr):
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _fmt(value: object) -> str:
    return "-" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def render_section(r: dict[str, Any]) -> str:
    begin, end = markers("capacity")
    knees = "\n".join(
        f"| {s['stage']} | {s['what']} | **{_fmt(s['knee_per_s'])}** | {_fmt(s['knee_throughput_per_s'])} | "
        f"{_fmt(s['broke_at_per_s'])} |" for s in r["stages"])
    steps = "\n".join(
        f"| {s['stage']} | {_fmt(st['offered_per_s'])} | {_fmt(st['throughput_per_s'])} | {_fmt(st['p50_ms'])} | "
        f"{_fmt(st['p95_ms'])} | {_fmt(st['p99_ms'])} | {st['unfinished']} of {st['items']} | "
        f"{'held' if st['held'] else 'broke'} | {st['load_average']} |"
        for s in r["stages"] for st in s["steps"])
    return f"""{begin}
## Capacity: the knee of every stage (`modpipe bench capacity`)

`{r['command']}` on {r['machine']} ({r['measured_at']}, {r['wall_s']} s; load average {r['load_average_before']}
before, {r['load_average_after']} after: the machine is shared, so read the shape and the order of the knees more
than the absolute numbers). One private stack; each stage alone in a fresh keyspace with only its workers; steps
of {r['step_s']:g} s, each {r['factor']:g}x the last, until p95 passes {r['max_p95_ms']:g} ms or more than 1 % of
a step's items are unfinished {r['grace_s']:g} s after it. The knee is the highest offered load that held; the
next step broke the bar. The bench's publisher and observer run on the same cores.

![capacity: p95 latency and throughput against offered load, per stage](capacity.png)

| stage | fed / timed | knee (items/s) | throughput at the knee (items/s) | broke at (items/s) |
|---|---|---|---|---|
{knees}

| stage | offered (items/s) | throughput (items/s) | p50 (ms) | p95 (ms) | p99 (ms) | unfinished | step | load average |
|---|---|---|---|---|---|---|---|---|
{steps}
{end}"""
