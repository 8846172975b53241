"""``modpipe bench review``: R concurrent reviewers claim and decide N items over HTTP against a real service.

Starts a private broker and Redis (no Triton), the review service as its own process (``modpipe review serve``),
fills the queues with N tasks, and lets R reviewer clients (each with its own token) claim and decide until the
queues are empty. Then it checks what platforms would see: the distinct final verdicts on ``moderation.verdicts``
and the audit entries on ``moderation.decisions``. Reports decided, double_assigned (an item handed to two
reviewers), lost (neither decided nor still queued) and claim/decide latency percentiles.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import httpx
from rich.console import Console

from pipeline import stack as local_stack
from pipeline.host import machine_summary
from pipeline.harness.bench.docs import BENCHMARKS_MD, markers, replace_section
from pipeline.config import PROJECT_ROOT, KafkaSettings, RedisSettings, Settings
from pipeline.reports import percentile, write_json
from pipeline.broker import ensure_topics
from pipeline.policies import PolicyLibrary
from pipeline.review.auth import Role, TokenStore
from pipeline.review.queue import ReviewQueue, severities_from
from pipeline.harness import services
from pipeline.harness.review import read_topic, sample_task
from pipeline.schemas import ReviewDecision, Stage, Verdict, VerdictStatus
from pipeline.store import RedisStore

BEGIN, END = markers("review")


async def run_review_bench(reviewers: int, items: int, json_out: Path | None, markdown: bool,
                           console: Console) -> dict:
    state_dir = Path(tempfile.mkdtemp(prefix="modpipe-bench-review-"))
    console.print("[bold]starting a private broker and Redis[/]")
    info = local_stack.stack_up(state_dir, private_redis=True, start_triton=False)
    prefix = f"benchreview{uuid.uuid4().hex[:6]}."
    admin = secrets.token_urlsafe(24)
    port = local_stack.free_port()
    settings = Settings(
        state_dir=state_dir,
        kafka=KafkaSettings(bootstrap_servers=info.kafka_bootstrap, topic_prefix=prefix, partitions=4),
        redis=RedisSettings(url=info.redis_url, key_prefix=prefix),
    )
    env = {**os.environ, **info.env(), "MODPIPE_KAFKA__TOPIC_PREFIX": prefix, "MODPIPE_REDIS__KEY_PREFIX": prefix,
           "MODPIPE_REVIEW__ADMIN_TOKEN": admin, "MODPIPE_WORKER__LOG_LEVEL": "WARNING"}
    server: subprocess.Popen[bytes] | None = None
    store = RedisStore(settings.redis)
    try:
        await ensure_topics(settings.kafka)
        library = PolicyLibrary.from_settings(settings.reasoner, strict=False)
        policy_ids = library.ids()
        queue = ReviewQueue(store, severities_from(library))
        console.print(f"[bold]queueing {items} tasks[/] over {len(policy_ids)} policies")
        ids = [f"rb-{i:06d}" for i in range(items)]
        for start in range(0, items, 50):
            await asyncio.gather(*(
                queue.enqueue(sample_task(cid, policy_ids=(policy_ids[i % len(policy_ids)],), cited=(),
                                          age_s=items - i))
                for i, cid in enumerate(ids[start:start + 50], start)
            ))
        tokens = TokenStore(store)
        reviewer_tokens = [await tokens.create(f"bench-{i:03d}", Role.REVIEWER) for i in range(reviewers)]
        violates = {pid: next(r.rule_id for r in library.get(pid).rules if r.label == 1) for pid in policy_ids}

        url = f"http://127.0.0.1:{port}"
        log_path = state_dir / "review-serve.log"
        server = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "review", "serve", "--host", "127.0.0.1", "--port", str(port)],
            env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, cwd=PROJECT_ROOT,
        )
        await services.wait_healthy(url, server, log_path, "the review service")
        console.print(f"[bold]{reviewers} reviewers[/] claiming and deciding over HTTP ({url})")

        claims: dict[str, list[int]] = defaultdict(list)
        claim_ms: list[float] = []
        decide_ms: list[float] = []
        errors: dict[str, int] = defaultdict(int)
        decided_ok = 0

        async def reviewer(n: int, client: httpx.AsyncClient) -> None:
            nonlocal decided_ok
            headers = {"Authorization": f"Bearer {reviewer_tokens[n]}"}
            while True:
                t0 = time.perf_counter()
                response = await client.post("/v1/claims", headers=headers, json={})
                claim_ms.append((time.perf_counter() - t0) * 1000)
                if response.status_code == 204:
                    return
                if response.status_code != 200:
                    errors[f"claim {response.status_code}"] += 1
                    await asyncio.sleep(0.05)
                    continue
                view = response.json()
                cid = view["content_id"]
                claims[cid].append(n)
                pid = view["policies"][0]["policy_id"]
                remove = int(cid[-1]) % 2 == 0
                body = {"decision": "remove" if remove else "allow", "policy_id": pid,
                        "rule_id": violates[pid] if remove else None, "note": "bench"}
                t0 = time.perf_counter()
                response = await client.post(f"/v1/items/{cid}/decision", headers=headers, json=body)
                decide_ms.append((time.perf_counter() - t0) * 1000)
                if response.status_code == 200:
                    decided_ok += 1
                else:
                    errors[f"decide {response.status_code}"] += 1

        t0 = time.monotonic()
        limits = httpx.Limits(max_connections=reviewers, max_keepalive_connections=reviewers)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:
            await asyncio.gather(*(reviewer(n, client) for n in range(reviewers)))
        wall_s = time.monotonic() - t0

        console.print("[bold]checking the verdicts and the audit log on Kafka[/]")
        kafka = settings.kafka
        wanted = set(ids)

        def finals_of(values: list[bytes]) -> set[str]:
            out = set()
            for v in values:
                verdict = Verdict.model_validate_json(v)
                if verdict.status is VerdictStatus.FINAL and verdict.stage is Stage.REVIEW:
                    out.add(verdict.content_id)
            return out & wanted

        verdict_values = await read_topic(kafka, kafka.topic(kafka.verdicts_topic),
                                          lambda vs: len(vs) >= items, timeout_s=60)
        finals = finals_of(verdict_values)
        audit_values = await read_topic(kafka, kafka.topic(kafka.decisions_topic),
                                        lambda vs: len(vs) >= items, timeout_s=30)
        audited = {ReviewDecision.model_validate_json(v).content_id for v in audit_values} & wanted
        counts, still_claimed = await queue.counts()
        still_queued = sum(c.pending for c in counts) + still_claimed
        report = {
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_summary(),
            "reviewers": reviewers,
            "items": items,
            "decided": len(finals),
            "decided_http_200": decided_ok,
            "final_verdict_messages": sum(1 for v in verdict_values if b'"status":"final"' in v),
            "audited": len(audited),
            "double_assigned": sum(1 for who in claims.values() if len(who) > 1),
            "lost": items - len(finals) - still_queued,
            "still_queued": still_queued,
            "errors": dict(errors),
            "wall_s": round(wall_s, 2),
            "decisions_per_s": round(decided_ok / wall_s, 1) if wall_s else None,
            "claim_latency_ms": {"p50": percentile(claim_ms, 50), "p99": percentile(claim_ms, 99)},
            "decide_latency_ms": {"p50": percentile(decide_ms, 50), "p99": percentile(decide_ms, 99)},
        }
    finally:
        if server is not None:
            services.stop(server)
        await store.close()
        local_stack.stack_down(state_dir)
    write_json(json_out, report)
    if markdown:
        write_markdown(report)
    console.print_json(data=report)
    return report


def write_markdown(report: dict, path: Path = BENCHMARKS_MD) -> None:
    """Replace the review section of docs/BENCHMARKS.md, keeping every other section."""
    claim, decide = report["claim_latency_ms"], report["decide_latency_ms"]
    body = f"""{BEGIN}
## Review: concurrent reviewers over HTTP (`modpipe bench review`)

Measured {report['measured_at']} on {report['machine']}: `modpipe bench review --reviewers {report['reviewers']}
--items {report['items']}`. One `modpipe review serve` process (uvicorn, one worker), a private Redis and Tansu broker;
the reviewer clients run in one other process on the same machine.

| measure | value |
|---|---|
| items decided (distinct final verdicts on `moderation.verdicts`) | {report['decided']} of {report['items']} |
| audit entries on `moderation.decisions` (distinct items) | {report['audited']} |
| double assigned (an item handed to two reviewers) | {report['double_assigned']} |
| lost (neither decided nor still queued) | {report['lost']} |
| claim latency p50 / p99 | {claim['p50']} / {claim['p99']} ms |
| decide latency p50 / p99 (ledger, Kafka publish with acks=all) | {decide['p50']} / {decide['p99']} ms |
| decisions per second | {report['decisions_per_s']} |
| errors | {report['errors'] or 'none'} |
{END}"""
    replace_section("review", body, path)
