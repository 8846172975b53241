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


# -- infrastructure faults, poison pills and backpressure ----------------------------------------------------------

dependency_up = Gauge(
    "modpipe_dependency_up",
    "0 while a worker pauses because a dependency (redis, broker, triton) is unavailable, 1 once it is back.",
    ["dependency"],
)
outage_pauses_total = Counter(
    "modpipe_outage_pauses_total", "Pauses taken waiting for an unavailable dependency.", ["dependency"]
)
worker_ready = Gauge(
    "modpipe_worker_ready", "1 while the worker has its handler built, owns partitions and no dependency is down."
)
consumer_lag = Gauge(
    "modpipe_consumer_lag",
    "Messages on a role's input topic not yet committed by its consumer group (sampled by each worker for the "
    "partitions it owns: sum() over a role's workers).",
    ["role"],
)
backlog_exceeded = Gauge(
    "modpipe_backlog_exceeded",
    "1 while a role's whole-group lag is above its bound (limits.reasoning_backlog for reasoning), else 0.",
    ["role"],
)
offset_resets_total = Counter(
    "modpipe_offset_resets_total",
    "Partitions whose committed offset lay beyond the log end (recreated topic, restored broker), reset to the "
    "log start.",
    ["role"],
)
offset_gaps_total = Counter(
    "modpipe_offset_gaps_total",
    "Times a worker's consumer skipped offsets of a partition and the worker fetched the skipped records itself.",
    ["stage"],
)
crash_loop_dead_letters_total = Counter(
    "modpipe_crash_loop_dead_letters_total",
    "Records dead-lettered because the worker crashed on them limits.max_attempts times.",
    ["stage"],
)
publish_failures_total = Counter(
    "modpipe_publish_failures_total",
    "Sends the broker did not acknowledge (the effect is retried after a pause; nothing is marked published).",
    ["reason"],
)
worker_exits_total = Counter(
    "modpipe_worker_exits_total",
    "Times a worker gave up and exited for its supervisor to restart it, by cause (stalled, start_failed).",
    ["cause"],
)


# -- the HTTP services (review, gateway): requests refused at the edge, authentication ------------------------------

http_refused_total = Counter(
    "modpipe_http_refused_total",
    "Requests refused before a handler ran, by service (review, gateway) and reason (body_too_large, "
    "invalid_request).",
    ["service", "reason"],
)
auth_failures_total = Counter(
    "modpipe_auth_failures_total",
    "Failed authentications by service and credential (token: a bearer token, session: a web-session cookie, "
    "login: a token posted to the login route).",
    ["service", "credential"],
)
rate_limited_total = Counter(
    "modpipe_rate_limited_total",
    "Requests refused with 429 by a per-client rate limit, by service and limit (login, auth_failures).",
    ["service", "limit"],
)


# -- reasoner: tokens spent --------------------------------------------------------------------------------------

reasoner_tokens_total = Counter(
    "modpipe_reasoner_tokens_total",
    "Tokens of reasoning-model calls by direction (input, output), policy and effort: the backend's counts when it "
    "reports them, else o200k counts made by the reasoner. Cached answers spend none.",
    ["direction", "policy", "effort"],
)


def reasoner_tokens(policy: str, effort: str, input_tokens: int | None, output_tokens: int | None) -> None:
    """Count one model call's tokens (``policy`` is a policy id from the library: a bounded set)."""
    if input_tokens:
        reasoner_tokens_total.labels("input", policy, effort).inc(input_tokens)
    if output_tokens:
        reasoner_tokens_total.labels("output", policy, effort).inc(output_tokens)


# -- triage: live prior and language rule --------------------------------------------------------------------------

triage_prior = Gauge(
    "modpipe_triage_prior",
    "Violation rate each triage head's scores are corrected to (the training rate until the adaptive estimate "
    "moves); head is `any` or a category code of the artefact.",
    ["head"],
)
triage_unvalidated_language_total = Counter(
    "modpipe_triage_unvalidated_language_total",
    "Items detected in a language the triage artefact was not validated on (escalated, never auto-decided); "
    "language is a py3langid code (a closed set of 97).",
    ["language"],
)


# -- the gateway and webhook delivery ------------------------------------------------------------------------------

gateway_items_total = Counter(
    "modpipe_gateway_items_total",
    "Items submitted to the gateway by route (items, moderate, moderations) and outcome (accepted, duplicate, edit, "
    "conflict, backpressure, unavailable).",
    ["route", "outcome"],
)
gateway_request_seconds = Histogram(
    "modpipe_gateway_request_seconds",
    "Gateway request time by route and status class (2xx, 4xx, 5xx).",
    ["route", "status"],
    buckets=LATENCY_BUCKETS,
)
gateway_waits_total = Counter(
    "modpipe_gateway_waits_total",
    "Synchronous checks by route (moderate, moderations) and result: final (a final verdict within the deadline), "
    "provisional (hidden pending at the deadline), none (no verdict yet at the deadline).",
    ["route", "result"],
)
gateway_triage_lag = Gauge(
    "modpipe_gateway_triage_lag", "The triage consumer lag as this gateway last read it; -1 while it is unknown."
)
webhook_deliveries_total = Counter(
    "modpipe_webhook_deliveries_total",
    "Webhook deliveries by outcome (delivered, dead_lettered, parked: queued behind a dead letter or for a suspended "
    "platform, replayed).",
    ["outcome"],
)
webhook_attempts_total = Counter(
    "modpipe_webhook_attempts_total",
    "Webhook delivery attempts by result (ok, http_error, timeout, connect_error).",
    ["result"],
)
webhook_delivery_seconds = Histogram(
    "modpipe_webhook_delivery_seconds",
    "From the verdict's decided_at to its successful delivery.",
    buckets=LATENCY_BUCKETS,
)
webhook_pending = Gauge(
    "modpipe_webhook_pending", "Verdicts a deliverer holds that are neither delivered nor dead-lettered yet."
)
webhook_suspended_platforms = Gauge(
    "modpipe_webhook_suspended_platforms",
    "Platforms this deliverer has suspended after webhooks.suspend_after consecutive dead letters.",
)


# -- the policy lifecycle: shadow judgements, the versions workers enforce, retroaction ----------------------------

shadow_judgements_total = Counter(
    "modpipe_shadow_judgements_total",
    "Shadow judgements by policy and outcome (agree, flip, unsettled: judged and compared with enforcement; "
    "skipped_budget, skipped_busy: not judged, the model-call budget or the in-flight bound was reached; failed: "
    "the judgement or its publication failed).",
    ["policy", "outcome"],
)
shadow_model_calls_total = Counter(
    "modpipe_shadow_model_calls_total",
    "Model calls spent on shadow judgements by policy (cached answers excluded): the budget "
    "lifecycle.shadow_calls_per_s bounds their rate per worker.",
    ["policy"],
)
policy_version_changes_total = Counter(
    "modpipe_policy_version_changes_total",
    "Enforcing-version changes a worker picked up from the registry (promotions and rollbacks), by policy and "
    "result (applied, refused: the version's text is missing, does not hash to its version or does not lint).",
    ["policy", "result"],
)
policy_registry_errors_total = Counter(
    "modpipe_policy_registry_errors_total",
    "Failed reads of the policy registry by workers (they keep the versions they have until a read succeeds).",
)
retroaction_items_total = Counter(
    "modpipe_retroaction_items_total",
    "Items a retroaction run looked at, by policy and outcome (published, unchanged, unsettled, skipped_reviewed, "
    "skipped_superseded, skipped_in_review, already, failed).",
    ["policy", "outcome"],
)
triage_allow_level = Gauge(
    "modpipe_triage_allow_level",
    "The allow level the router uses: the artefact's, or lower when the prior correction's miss budget caps it.",
)
