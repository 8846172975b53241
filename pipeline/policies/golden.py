"""``modpipe policy test``: run a policy's golden set against any reasoner endpoint and score it.

Why: a policy is software, and its golden set is its test suite. An author changes the words, runs the golden set
against the model that will enforce it (Triton with gpt-oss-safeguard, the CPU stand-in, ``vllm serve``, Ollama,
LM Studio) and sees accuracy, F1, the confusion matrix, which rows broke, the false-positive traps (safe rows that
reference XSTest / HateCheck), how well calibrated the model's probabilities are (expected calibration error and a
reliability plot, for the self-reported confidence and, where the backend returns token log-probabilities, for the
verdict token's probability), how many answers were truncated or unreadable, and what it costs (tokens, latency).
Referenced rows are resolved from the datasets folder (``MODPIPE_DATASETS_DIR``) before the first call.

Every row is one call at one effort, with no cache and no escalation, so the numbers describe the policy text
and the model, not the pipeline around them (a truncated answer is still asked once more with a larger budget,
as the reasoner always does). A call that fails or answers unusably counts as wrong.

Endpoint URLs: ``triton://host:port/model`` (or ``grpc://``) for Triton's decoupled generate over gRPC;
``http(s)://host:port/v1`` for an OpenAI-compatible chat endpoint (the model name from ``--model``);
``ollama://host:port/model`` for Ollama's native ``/api/chat``.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from pipeline.config import ReasonerSettings, Settings, TritonSettings
from pipeline.errors import PolicyError
from pipeline.policies import GoldenExample, Policy, PolicyLibrary
from pipeline.policies.model import resolve_golden
from pipeline.reports import percentile
from pipeline.reasoner.backends import ReasonerBackend
from pipeline.reasoner.backends.triton import HarmonyBackend, TritonGrpcTransport
from pipeline.reasoner.core import SafeguardReasoner
from pipeline.schemas import TRANSPORT_FAILURES, CallFailure, ContentItem, Effort, ReasonerCall

CALIBRATION_BINS = 10


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "triton", "openai" or "ollama"
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
    if parts.scheme == "ollama":
        name = parts.path.strip("/") or model
        if not parts.netloc or not name:
            raise ValueError(f"{url!r}: expected ollama://host:port/MODEL")
        return Endpoint("ollama", f"http://{parts.netloc}", name)
    if parts.scheme in ("http", "https"):
        if not parts.netloc:
            raise ValueError(f"{url!r}: expected http(s)://host:port/v1")
        return Endpoint("openai", url.rstrip("/"), model or ReasonerSettings.model_fields["openai_model"].default)
    raise ValueError(f"{url!r}: the reasoner URL must start with triton://, grpc://, ollama://, http:// or https://")


def configured_endpoint(settings: Settings) -> Endpoint:
    """The endpoint the workers' reasoner uses (``reasoner.backend`` and its settings)."""
    reasoner = settings.reasoner
    if reasoner.backend == "openai":
        return Endpoint("openai", reasoner.openai_base_url.rstrip("/"), reasoner.openai_model)
    if reasoner.backend == "ollama":
        return Endpoint("ollama", reasoner.ollama_url.rstrip("/"), reasoner.ollama_model)
    return Endpoint("triton", settings.triton.grpc_url, settings.triton.reasoner_model)


def backend_for(endpoint: Endpoint, timeout_s: float, api_key: str | None = None,
                reasoner: ReasonerSettings | None = None) -> ReasonerBackend:
    """The backend for ``endpoint``, with the budgets, context and logprobs of ``reasoner`` (defaults if None)."""
    reasoner = reasoner or ReasonerSettings()
    if endpoint.kind == "triton":
        triton = TritonSettings(grpc_url=endpoint.address, reasoner_model=endpoint.model, request_timeout_s=timeout_s)
        return HarmonyBackend(TritonGrpcTransport(triton), endpoint.model, logprobs=reasoner.logprobs)
    if endpoint.kind == "ollama":
        from pipeline.reasoner.backends.ollama import OllamaChatBackend

        return OllamaChatBackend(reasoner.model_copy(update={"ollama_url": endpoint.address,
                                                            "ollama_model": endpoint.model}), timeout_s)
    from pipeline.reasoner.backends.openai import OpenAIChatBackend

    settings = reasoner.model_copy(update={
        "openai_base_url": endpoint.address, "openai_model": endpoint.model,
        **({"openai_api_key": SecretStr(api_key)} if api_key else {}),
    })
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


def _violation_probability(call: ReasonerCall, source: str) -> float | None:
    """P(violation) a call stated: from the verdict token's logprobs, or from the self-report and the answer."""
    if call.violation is None:
        return None
    if source == "logprob":
        return call.verdict_probability
    if call.confidence is None:
        return None
    return call.confidence if call.violation else 1.0 - call.confidence


def calibration(pairs: list[tuple[float, int]], bins: int = CALIBRATION_BINS) -> dict | None:
    """Expected calibration error of P(violation) against the labels, with the reliability bins behind it."""
    if not pairs:
        return None
    table = []
    ece = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        members = [(p, y) for p, y in pairs if lo <= p < hi or (b == bins - 1 and p == 1.0)]
        if not members:
            continue
        mean_p = statistics.fmean(p for p, _ in members)
        observed = statistics.fmean(y for _, y in members)
        ece += len(members) / len(pairs) * abs(mean_p - observed)
        table.append({"bin": f"{lo:.1f}-{hi:.1f}", "rows": len(members), "mean_predicted": round(mean_p, 4),
                      "observed": round(observed, 4)})
    brier = statistics.fmean((p - y) ** 2 for p, y in pairs)
    return {"rows": len(pairs), "ece": round(ece, 4), "brier": round(brier, 4), "bins": table}


def score(policy: Policy, results: list[RowResult]) -> dict:
    """Accuracy, precision/recall/F1 (violation = positive), confusion matrix, calibration, rules, traps, cost."""
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
    outputs = [r.call.completion_tokens for r in results if r.call.completion_tokens is not None]
    inputs = [r.call.prompt_tokens for r in results if r.call.prompt_tokens is not None]
    with_rule = [r for r in results if r.row.rule_id]
    truncated = sum(r.call.failure is CallFailure.TRUNCATED for r in results)
    unparseable = sum(r.call.failure is CallFailure.INVALID_OUTPUT for r in results)
    transport = sum(r.call.failure in TRANSPORT_FAILURES for r in results)
    calibrations = {}
    for source in ("self_report", "logprob"):
        pairs = [(p, r.row.label) for r in results if (p := _violation_probability(r.call, source)) is not None]
        calibrations[source] = calibration(pairs)
    return {
        "policy": policy.policy_id,
        "version": policy.version,
        "answer_format": policy.answer_format.describe(),
        "rows": len(results),
        "accuracy": round(sum(r.correct for r in results) / len(results), 4) if results else 0.0,
        "precision": round(precision, 4),
        "recall": round(recall, 4),
        "f1": round(f1, 4),
        "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "no_answer": len(failed)},
        "rule_match": round(sum(r.row.rule_id in r.call.rule_ids for r in with_rule) / len(with_rule), 4)
        if with_rule else None,
        "hallucinated_citations": sum(bool(r.call.invalid_rule_ids) for r in results),
        "schema_violations": sum(bool(r.call.output_errors) for r in results),
        "truncated": truncated,
        "unparseable": unparseable,
        "transport_failures": transport,
        "truncated_or_unparseable_share": round((truncated + unparseable) / len(results), 4) if results else 0.0,
        "truncation_retries": sum(r.call.truncation_retries for r in results),
        "calibration": calibrations,
        "false_positive_traps": {"rows": len(traps), "flagged": sum(r.predicted == 1 for r in traps)},
        "latency_ms": {
            "mean": round(statistics.fmean(latencies), 1) if latencies else None,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
        },
        "completion_tokens": {
            "mean": round(statistics.fmean(outputs), 1) if outputs else None,
            "total": sum(outputs) if outputs else None,
        },
        "prompt_tokens": {
            "mean": round(statistics.fmean(inputs), 1) if inputs else None,
            "total": sum(inputs) if inputs else None,
        },
        "tokens_from_backend": all(r.call.tokens_from_backend for r in results if r.call.completion_tokens is not None),
        "errors": [
            {"text": r.row.text[:80], "ref": r.row.ref, "label": r.row.label, "expected_rule": r.row.rule_id,
             "predicted": r.predicted, "cited": r.call.rule_ids + r.call.invalid_rule_ids,
             "confidence": r.call.confidence, "p_violation": r.call.verdict_probability, "error": r.call.error}
            for r in results if not r.correct
        ],
    }


def reliability_plot(reports: list[dict], path: Path) -> Path:
    """A reliability diagram (PNG): observed violation rate against predicted P(violation), per policy and source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6), sharey=True)
    for ax, source, title in ((axes[0], "self_report", "self-reported confidence"),
                              (axes[1], "logprob", "verdict token probability")):
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        for report in reports:
            cal = report["calibration"].get(source)
            if not cal:
                continue
            xs = [b["mean_predicted"] for b in cal["bins"]]
            ys = [b["observed"] for b in cal["bins"]]
            ax.plot(xs, ys, marker="o", label=f"{report['policy']} (ECE {cal['ece']:.3f})")
        ax.set_title(f"{title}")
        ax.set_xlabel("predicted P(violation)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    axes[0].set_ylabel("observed violation rate")
    model = reports[0].get("model", "") if reports else ""
    fig.suptitle(f"Reliability on the golden sets ({model})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


async def run_golden(
    library: PolicyLibrary,
    policy_id: str,
    backend: ReasonerBackend,
    *,
    datasets_dir: Path,
    effort: Effort | None = None,
    concurrency: int = 8,
    timeout_s: float = 120.0,
    reasoner_settings: ReasonerSettings | None = None,
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
    settings = (reasoner_settings or ReasonerSettings()).model_copy(update={"cache_enabled": False})
    reasoner = SafeguardReasoner(triton, settings, library, backend=backend)
    started = time.perf_counter()
    async with reasoner:
        calls = await asyncio.gather(*(
            reasoner.call(ContentItem(content_id=f"golden-{i}", text=row.text), policy, effort)
            for i, row in enumerate(golden)
        ))
    report = score(policy, [RowResult(row, call) for row, call in zip(golden, calls)])
    report.update({"effort": effort.value, "model": backend.model, "wall_s": round(time.perf_counter() - started, 2)})
    return report
