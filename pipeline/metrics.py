"""Every Prometheus metric the pipeline exports, in one place, with bounded labels only.

Labels are drawn from small closed sets (stage, outcome, policy id, model, effort): never a content id or text.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

messages_total = Counter(
    "modpipe_messages_total", "Messages handled per stage and outcome.", ["stage", "outcome"]
)
verdicts_total = Counter(
    "modpipe_verdicts_total", "Verdicts published.", ["stage", "status", "decision"]
)
escalations_total = Counter("modpipe_escalations_total", "Items sent to the reasoner.", ["reason"])
review_tasks_total = Counter("modpipe_review_tasks_total", "Items sent to human review.", ["reason"])
dead_letters_total = Counter("modpipe_dead_letters_total", "Messages dead-lettered.", ["stage", "error_type"])
retries_total = Counter("modpipe_retries_total", "Retried operations.", ["stage", "error_type"])
redeliveries_total = Counter(
    "modpipe_redeliveries_total", "Messages whose effect was already recorded (redelivery or replay).", ["stage"]
)
triage_latency_seconds = Histogram(
    "modpipe_triage_latency_seconds", "Embedding plus scoring time per batch.", buckets=LATENCY_BUCKETS
)
triage_batch_size = Histogram(
    "modpipe_triage_batch_size", "Items per triage batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
reasoner_latency_seconds = Histogram(
    "modpipe_reasoner_latency_seconds",
    "One generate call to the reasoning model.",
    ["model", "effort", "outcome"],
    buckets=LATENCY_BUCKETS,
)
verdict_latency_seconds = Histogram(
    "modpipe_verdict_latency_seconds",
    "From arrival on content.incoming to a published verdict.",
    ["stage", "status"],
    buckets=LATENCY_BUCKETS,
)


def serve(port: int) -> None:
    """Expose the metrics over HTTP on ``port`` (0 leaves them unexposed)."""
    if port:
        start_http_server(port, addr="0.0.0.0")
