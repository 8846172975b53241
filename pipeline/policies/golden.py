"""``modpipe policy test``: run a policy's golden set against any reasoner endpoint and score it.

Why: a policy is software, and its golden set is its test suite. An author changes the words, runs the golden set
against the model that will enforce it (Triton with gpt-oss-safeguard, the CPU stand-in, or any
OpenAI-compatible server such as ``vllm serve`` or Ollama) and sees accuracy, F1, the confusion matrix, which
rows broke, the false-positive traps (safe rows that reference XSTest / HateCheck) and what it costs (tokens,
latency). Referenced rows are resolved from the datasets folder (``MODPIPE_DATASETS_DIR``) before the first call.

Every row is one call at one effort, with no cache and no escalation, so the numbers describe the policy text
and the model, not the pipeline around them. A call that fails or answers unusably counts as wrong.

Endpoint URLs: ``triton://host:port/model`` (or ``grpc://``) for Triton's decoupled generate over gRPC;
``http(s)://host:port/v1`` for an OpenAI-compatible chat endpoint (the model name from ``--model``).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.config import ReasonerSettings, TritonSettings
from pipeline.errors import PolicyError
from pipeline.policies import GoldenExample, Policy, PolicyLibrary
from pipeline.policies.model import resolve_golden
from pipeline.reports import percentile
from pipeline.reasoner.backends import ReasonerBackend
from pipeline.reasoner.backends.triton import HarmonyBackend, TritonGrpcTransport
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.schemas import ContentItem, Effort, ReasonerCall


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "triton" or "openai"
    address: str  # host:port for triton, base URL for openai
    model: str


def parse_endpoint(url: str, model: str | None = None) -> Endpoint:
    """``triton://host:port/model`` or ``http(s)://host:port/v1`` (+ ``model``); ValueError otherwise."""
    parts = urlsplit(url)
    if parts.scheme in ("triton", "grpc"):
        name = parts.path.strip("/") or model
        if not parts.netloc or not name:
            raise ValueError(f"{url!r}: expected triton://host:port/MODEL")
        return Endpoint("triton", parts.netloc, name)
    if parts.scheme in ("http", "https"):
        if not parts.netloc:
            raise ValueError(f"{url!r}: expected http(s)://host:port/v1")
        return Endpoint("openai", url.rstrip("/"), model or ReasonerSettings.model_fields["openai_model"].default)
    raise ValueError(f"{url!r}: the reasoner URL must start with triton://, grpc://, http:// or https://")


def backend_for(endpoint: Endpoint, timeout_s: float, api_key: str | None = None) -> ReasonerBackend:
    if endpoint.kind == "triton":
        triton = TritonSettings(grpc_url=endpoint.address, reasoner_model=endpoint.model, request_timeout_s=timeout_s)
        return HarmonyBackend(TritonGrpcTransport(triton), endpoint.model)
    from pipeline.reasoner.backends.openai import OpenAIChatBackend

    settings = ReasonerSettings(
        openai_base_url=endpoint.address, openai_model=endpoint.model, openai_api_key=api_key  # type: ignore[arg-type]
    )
    return OpenAIChatBackend(settings, timeout_s)


@dataclass(frozen=True)
class RowResult:
    row: GoldenExample
    call: ReasonerCall

    @property
    def predicted(self) -> int | None:
        return None if self.call.violation is None else int(self.call.violation)

    @property
    def correct(self) -> bool:
        return self.predicted == self.row.label


def score(policy: Policy, results: list[RowResult]) -> dict:
    """Accuracy, precision/recall/F1 (violation = positive), confusion matrix, rules, traps, cost."""
    tp = sum(r.predicted == 1 and r.row.label == 1 for r in results)
    fp = sum(r.predicted == 1 and r.row.label == 0 for r in results)
    fn = sum(r.predicted == 0 and r.row.label == 1 for r in results)
    tn = sum(r.predicted == 0 and r.row.label == 0 for r in results)
    failed = [r for r in results if r.predicted is None]
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn + sum(r.row.label == 1 for r in failed)) if results else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    traps = [r for r in results if r.row.label == 0 and r.row.ref]
    latencies = sorted(r.call.latency_ms for r in results)
    tokens = [r.call.completion_tokens for r in results if r.call.completion_tokens is not None]
    return {
        "policy": policy.policy_id,
        "version": policy.version,
        "rows": len(results),
        "accuracy": round(sum(r.correct for r in results) / len(results), 4) if results else 0.0,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "no_answer": len(failed)},
        "rule_match": round(sum(r.row.rule_id in r.call.rule_ids for r in results) / len(results), 4)
        if results else 0.0,
        "hallucinated_citations": sum(bool(r.call.invalid_rule_ids) for r in results),
        "schema_violations": sum(bool(r.call.output_errors) for r in results),
        "false_positive_traps": {"rows": len(traps), "flagged": sum(r.predicted == 1 for r in traps)},
        "latency_ms": {
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
        },
        "completion_tokens": {
            "mean": round(statistics.fmean(tokens), 1) if tokens else None,
            "total": sum(tokens) if tokens else None,
        },
        "errors": [
            {"text": r.row.text[:80], "ref": r.row.ref, "label": r.row.label, "expected_rule": r.row.rule_id,
             "predicted": r.predicted, "cited": r.call.rule_ids + r.call.invalid_rule_ids,
             "confidence": r.call.confidence, "error": r.call.error}
            for r in results if not r.correct
        ],
    }


async def run_golden(
    library: PolicyLibrary,
    policy_id: str,
    backend: ReasonerBackend,
    *,
    datasets_dir: Path,
    effort: Effort | None = None,
    concurrency: int = 8,
    timeout_s: float = 120.0,
) -> dict:
    """Judge every golden row of ``policy_id`` once through ``backend`` and score the answers.

    ``datasets_dir`` (``Settings.datasets_dir``) holds the public sets the golden references point into; a
    reference that does not resolve raises :class:`~pipeline.policies.model.GoldenReferenceError` before any call.
    """
    policy = library.get(policy_id)
    if not policy.golden:
        raise PolicyError(f"policy {policy_id} has no golden set")
    golden = resolve_golden(policy.golden, datasets_dir)
    effort = Effort(effort or policy.first_effort)
    triton = TritonSettings(max_in_flight=concurrency, request_timeout_s=timeout_s, max_attempts=2,
                            backoff_initial_s=0.2)
    reasoner = SafeguardReasoner(triton, ReasonerSettings(cache_enabled=False), library, backend=backend)
    started = time.perf_counter()
    async with reasoner:
        calls = await asyncio.gather(*(
            reasoner.call(ContentItem(content_id=f"golden-{i}", text=row.text), policy, effort)
            for i, row in enumerate(golden)
        ))
    report = score(policy, [RowResult(row, call) for row, call in zip(golden, calls)])
    report.update({"effort": effort.value, "model": backend.model, "wall_s": round(time.perf_counter() - started, 2)})
    return report
