"""Every Prometheus metric the pipeline exports, in one place, with bounded labels only.

Labels are drawn from small closed sets (stage, outcome, policy id, model, effort): never a content id or text.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


# -- caches, the review queue, time hidden -------------------------------------------------------------------------
# Defined here so every role exports them (with zero samples until used); the code that owns each cache or queue
# instruments it. The Grafana dashboard (deploy/grafana/dashboards/modpipe.json) and docs/OPERATIONS.md read them.

HIDDEN_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)

cache_requests_total = Counter(
    "modpipe_cache_requests_total",
    "Cache lookups by cache (e.g. verdict, policy_prompt) and result (hit or miss); hit rate = hit / all.",
    ["cache", "result"],
)
review_queue_depth = Gauge(
    "modpipe_review_queue_depth",
    "Review tasks pending in the Redis queue (sampled; every sampler reports the same shared queue: use max()).",
)
review_queue_oldest_age_seconds = Gauge(
    "modpipe_review_queue_oldest_age_seconds",
    "Age of the oldest pending review task, 0 when the queue is empty (sampled like the depth).",
)
time_hidden_seconds = Histogram(
    "modpipe_time_hidden_seconds",
    "From the provisional hide to the final verdict that ends it, by the stage that decided (reasoner, review).",
    ["stage"],
    buckets=HIDDEN_BUCKETS,
)


def cache_lookup(cache: str, hit: bool) -> None:
    """Count one cache lookup; ``cache`` is a short fixed name, never a key."""
    cache_requests_total.labels(cache, "hit" if hit else "miss").inc()


def set_review_queue(depth: int, oldest_enqueued_at: float | None, now: float) -> None:
    """Record a sample of the review queue: its depth and the enqueue time (epoch seconds) of its oldest task."""
    review_queue_depth.set(depth)
    review_queue_oldest_age_seconds.set(max(0.0, now - oldest_enqueued_at) if oldest_enqueued_at else 0.0)


# -- human review: the review service's own metrics (queue depth and time hidden are above) ---------------------

review_actions_total = Counter(
    "modpipe_review_actions_total",
    "Reviewer actions by action (decide, skip, escalate, appeal) and outcome (ok, not_held, expired, ...).",
    ["action", "outcome"],
)
review_claim_seconds = Histogram(
    "modpipe_review_claim_seconds",
    "Time to claim the next review item (one Redis script), by result (item or empty).",
    ["result"],
    buckets=LATENCY_BUCKETS,
)


# -- reasoner: the circuit breaker's state -----------------------------------------------------------------------

reasoner_circuit_open = Gauge(
    "modpipe_reasoner_circuit_open",
    "1 while the reasoner's circuit breaker is open (calls fail fast and items go to review), else 0.",
)
