"""``modpipe bench gateway``: requests/s and latency of the gateway, served by ``modpipe gateway serve`` over HTTP.

The gateway runs as its own process (as in production), the load comes from this one over keep-alive HTTP
connections, ``concurrency`` requests in flight, in a private Redis keyspace (fresh idempotency records, a cold
verdict cache). Three measures:

* ``POST /v1/items`` batches and single items into a private topic that no worker consumes: the gateway's own cost
  (auth, validation, the idempotency script, the acknowledged publish), not triage's speed. Backpressure is set out
  of the way here (and its 429s counted, which should be none).
* ``POST /v1/moderate`` with new texts on the real topics, the local pipeline's workers behind it: the time to a
  final verdict, or to the deadline for items escalated to the reasoner (answered hidden_pending); on this kind of
  machine that is triage's latency, which ``modpipe bench spine`` measures on its own.
* ``POST /v1/moderate`` of the same items again: answered from the visibility store, no publish, no wait.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from pipeline.broker import ensure_topics
from pipeline.harness import services
from pipeline.harness.bench.docs import markers, replace_section
from pipeline.harness.demo import pipeline_running
from pipeline.harness.traffic import sample_items
from pipeline.host import machine_summary
from pipeline.reports import percentile, write_json
from pipeline.review.auth import Role, TokenStore
from pipeline.store.redis import RedisStore

WARM_UP = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _GatewayProcess:
    """``modpipe gateway serve`` in a child process, pointed at the bench's keyspace and topics."""

    def __init__(self, env: dict[str, str], log: Path, **settings: str) -> None:
        self.port = _free_port()
        self.env = {**env, "MODPIPE_GATEWAY__HOST": "127.0.0.1", "MODPIPE_GATEWAY__PORT": str(self.port),
                    "MODPIPE_WORKER__LOG_LEVEL": "WARNING", **settings}
        self.log = log

    async def __aenter__(self) -> str:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "gateway", "serve"], env=self.env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{self.port}"
        await services.wait_healthy(url, self.proc, self.log, "the gateway", timeout_s=120, request_timeout_s=2,
                                    interval_s=0.2)
        return url

    async def __aexit__(self, *exc: object) -> None:
        services.stop(self.proc, grace_s=20)
        self._log.close()


async def _drive(http: httpx.AsyncClient, requests: list[tuple[str, dict[str, Any]]],
                 concurrency: int) -> tuple[list[float], list[httpx.Response], float]:
    """Send ``requests`` (path, body) with ``concurrency`` in flight: (latencies ms, answers, wall seconds)."""
    latencies: list[float] = [0.0] * len(requests)
    answers: list[httpx.Response | None] = [None] * len(requests)
    queue = iter(range(len(requests)))

    async def client() -> None:
        for i in queue:
            path, body = requests[i]
            t0 = time.perf_counter()
            answers[i] = await http.post(path, json=body)
            latencies[i] = (time.perf_counter() - t0) * 1000

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return latencies, [a for a in answers if a is not None], time.perf_counter() - start


def _stats(latencies: list[float], wall_s: float, answers: list[httpx.Response], items: int) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for a in answers:
        statuses[str(a.status_code)] = statuses.get(str(a.status_code), 0) + 1
    return {"requests": len(latencies), "items": items, "requests_per_s": round(len(latencies) / wall_s, 1),
            "items_per_s": round(items / wall_s, 1), "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99), "statuses": statuses}


def _body(item: Any) -> dict[str, Any]:
    return item.model_dump(mode="json", exclude={"platform", "schema_version"})


async def run_gateway_bench(batches: int, batch_size: int, singles: int, moderate: int, concurrency: int,
                            deadline_ms: int, json_out: Path | None, state_dir: Path, console: Console,
                            write_docs: bool = True) -> dict[str, Any]:
    keyspace = f"modpipe-bench-gw-{uuid.uuid4().hex[:8]}:"
    ingest_prefix = f"bench-gw-{uuid.uuid4().hex[:8]}."
    async with pipeline_running(state_dir, console, "bench-gw", redis_key_prefix=keyspace) as ctx:
        settings = ctx.settings.model_copy(update={"redis": ctx.settings.redis.model_copy(
            update={"key_prefix": keyspace})})
        store = RedisStore(settings.redis)
        try:
            token = await TokenStore(store).create("bench", Role.PLATFORM)
        finally:
            await store.close()
        env = {k: v for k, v in ctx.workers.env.items() if not k.startswith("MODPIPE_GATEWAY__")}
        headers = {"Authorization": f"Bearer {token}"}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        log_dir = state_dir / "logs"

        console.print(f"[bold]/v1/items[/]: {batches} batches of {batch_size} and {singles} single items, "
                      f"{concurrency} in flight, into a topic no worker reads")
        ingest = _GatewayProcess(env, log_dir / "gateway-bench.log", MODPIPE_KAFKA__TOPIC_PREFIX=ingest_prefix,
                                 MODPIPE_GATEWAY__MAX_TRIAGE_LAG=str(10**9))
        await ensure_topics(settings.kafka.model_copy(update={"topic_prefix": ingest_prefix}))
        run = uuid.uuid4().hex[:8]
        pool = sample_items(batches * batch_size + singles + WARM_UP, f"gw-{run}", seed=11, distinct=True)
        async with ingest as url, httpx.AsyncClient(base_url=url, headers=headers, limits=limits,
                                                    timeout=60) as http:
            await _drive(http, [("/v1/items", _body(i)) for i in pool[:WARM_UP]], 1)
            rest = pool[WARM_UP:]
            batch_requests = [("/v1/items", {"items": [_body(i) for i in rest[b * batch_size:(b + 1) * batch_size]]})
                              for b in range(batches)]
            lat, answers, wall = await _drive(http, batch_requests, concurrency)
            batch_stats = _stats(lat, wall, answers, batches * batch_size)
            single_requests = [("/v1/items", _body(i)) for i in rest[batches * batch_size:]]
            lat, answers, wall = await _drive(http, single_requests, concurrency)
            single_stats = _stats(lat, wall, answers, len(single_requests))
        console.print(f"  batches: {batch_stats['requests_per_s']} requests/s ({batch_stats['items_per_s']} items/s), "
                      f"p50 {batch_stats['p50_ms']} ms, p99 {batch_stats['p99_ms']} ms")
        console.print(f"  single items: {single_stats['requests_per_s']} requests/s, p50 {single_stats['p50_ms']} ms")

        console.print(f"[bold]/v1/moderate[/]: {moderate} new texts, deadline {deadline_ms} ms, {concurrency} in "
                      "flight, the local pipeline deciding")
        fresh = sample_items(moderate + WARM_UP, f"gwm-{run}", seed=12, distinct=True)
        async with _GatewayProcess(env, log_dir / "gateway-bench.log") as url, httpx.AsyncClient(
                base_url=url, headers=headers, limits=limits, timeout=60) as http:
            path = f"/v1/moderate?deadline_ms={deadline_ms}"
            await _drive(http, [(path, _body(i)) for i in fresh[:WARM_UP]], 1)
            lat, answers, wall = await _drive(http, [(path, _body(i)) for i in fresh[WARM_UP:]], concurrency)
            moderate_stats = _stats(lat, wall, answers, moderate)
            bodies = [a.json() for a in answers if a.status_code == 200]
            final_ms = [b["waited_ms"] for b in bodies if b["final"]]
            moderate_stats.update(
                final_within_deadline=sum(b["final"] for b in bodies), timed_out=sum(b["timed_out"] for b in bodies),
                decisions={d: sum(b["decision"] == d for b in bodies) for d in ("allow", "block", "hidden_pending")},
                final_wait_p50_ms=percentile(final_ms, 50), final_wait_p99_ms=percentile(final_ms, 99))
            lat, answers, wall = await _drive(http, [(path, _body(i)) for i in fresh[WARM_UP:]], concurrency)
            known_stats = _stats(lat, wall, answers, moderate)
        console.print(f"  new: p50 {moderate_stats['p50_ms']} ms, p99 {moderate_stats['p99_ms']} ms, "
                      f"{moderate_stats['final_within_deadline']}/{moderate} final within the deadline")
        console.print(f"  known: {known_stats['requests_per_s']} requests/s, p50 {known_stats['p50_ms']} ms")
        await _drop_keyspace(settings, keyspace)  # while the stack (and its Redis) still runs; lag records expire

    report = {
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_summary(),
        "concurrency": concurrency,
        "batch_size": batch_size,
        "deadline_ms": deadline_ms,
        "items_batches": batch_stats,
        "items_single": single_stats,
        "moderate_new": moderate_stats,
        "moderate_known": known_stats,
    }
    write_json(json_out, report)
    if write_docs:
        _write_markdown(report)
    console.print_json(data=report)
    return report


async def _drop_keyspace(settings: Any, keyspace: str) -> None:
    """The bench's private keyspace is nobody's after the run (its keys would otherwise live for the replay window)."""
    store = RedisStore(settings.redis)
    try:
        batch: list[bytes] = []
        async for key in store.redis.scan_iter(match=keyspace.replace("*", "\\*") + "*", count=1000):
            batch.append(key)
            if len(batch) >= 500:
                await store.redis.delete(*batch)
                batch = []
        if batch:
            await store.redis.delete(*batch)
    finally:
        await store.close()


def _ok(stats: dict[str, Any]) -> str:
    return f"{stats['statuses'].get('200', 0) + stats['statuses'].get('202', 0)}/{stats['requests']}"


def _write_markdown(report: dict[str, Any]) -> None:
    begin, end = markers("gateway")
    b, s, m, k = (report[x] for x in ("items_batches", "items_single", "moderate_new", "moderate_known"))
    decisions = ", ".join(f"{n} {d}" for d, n in m["decisions"].items())
    body = f"""{begin}
## Gateway: HTTP ingest and synchronous checks (`modpipe bench gateway`)

Measured {report['measured_at']} on {report['machine']}. `modpipe gateway serve` runs as its own process
on the local stack (Tansu memory broker, Redis, the pipeline's workers on the same machine) in a fresh Redis
keyspace; the load comes from one process over keep-alive HTTP, {report['concurrency']} requests in flight, after
{WARM_UP} warm-up requests per phase.

| route | requests | ok | requests/s | items/s | p50 | p99 |
|---|---|---|---|---|---|---|
| `POST /v1/items`, batches of {report['batch_size']} (a topic no worker reads) | {b['requests']} | {_ok(b)} \
| {b['requests_per_s']} | {b['items_per_s']} | {b['p50_ms']} ms | {b['p99_ms']} ms |
| `POST /v1/items`, single items | {s['requests']} | {_ok(s)} | {s['requests_per_s']} | {s['items_per_s']} \
| {s['p50_ms']} ms | {s['p99_ms']} ms |
| `POST /v1/moderate`, new texts, deadline {report['deadline_ms']} ms | {m['requests']} | {_ok(m)} \
| {m['requests_per_s']} | - | {m['p50_ms']} ms | {m['p99_ms']} ms |
| `POST /v1/moderate`, the same items again | {k['requests']} | {_ok(k)} \
| {k['requests_per_s']} | - | {k['p50_ms']} ms | {k['p99_ms']} ms |

`/v1/items` is the gateway's own cost (token, validation, the idempotency script, the acknowledged publish).
New texts through `/v1/moderate`: {m['final_within_deadline']} of {m['requests']} had a final verdict within
the deadline (wait p50 {m['final_wait_p50_ms']} ms, p99 {m['final_wait_p99_ms']} ms: the triage stage's
latency under this load); {m['timed_out']} were answered at the deadline as hidden_pending (escalated to the
reasoner, or not triaged in time). Decisions: {decisions}. Asked again, decided items are answered from the
visibility store at once; the ones still hidden pending wait the deadline again (the p99).
{end}"""
    replace_section("gateway", body)
