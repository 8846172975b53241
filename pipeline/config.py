"""One frozen settings object, built once in ``main()`` and passed down.

Every field can be set from the environment as ``MODPIPE_<SECTION>__<FIELD>`` (for example
``MODPIPE_KAFKA__BOOTSTRAP_SERVERS``). ``modpipe stack up`` writes the addresses of the local stack to
``<state_dir>/stack.env``; :func:`load_settings` reads that file *under* the real environment, so an operator's
explicit variable always wins over the local stack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR_ENV = "MODPIPE_STATE_DIR"


def default_state_dir() -> Path:
    """Where the local stack keeps PIDs, logs and its ``stack.env`` (``MODPIPE_STATE_DIR`` overrides)."""
    return Path(os.environ.get(STATE_DIR_ENV, PROJECT_ROOT / ".modpipe")).resolve()


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaSettings(_Section):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated Kafka bootstrap servers.")
    topic_prefix: str = Field(
        "", description="Prepended to every topic name and consumer group (tests and side-by-side deployments)."
    )
    incoming_topic: str = Field("content.incoming", description="Where producers publish ContentItems.")
    escalations_topic: str = Field("moderation.escalations", description="Triage -> reasoning agent.")
    review_topic: str = Field("moderation.review", description="Edge cases waiting for a human reviewer.")
    verdicts_topic: str = Field("moderation.verdicts", description="Provisional and final verdicts for platforms.")
    deadletter_topic: str = Field("moderation.deadletter", description="Bad input and permanent failures.")
    decisions_topic: str = Field(
        "moderation.decisions", description="Audit log of reviewer actions (decisions, escalations, appeals) and of "
        "policy lifecycle actions (shadow, promote, rollback, retroaction)."
    )
    shadow_topic: str = Field(
        "moderation.shadow", description="What candidate policy versions would have said about live items (never "
        "enforced)."
    )
    partitions: int = Field(4, ge=1, description="Partitions per topic when the project creates them.")
    replication_factor: int = Field(1, ge=1, description="Replication factor when the project creates topics.")
    session_timeout_s: float = Field(
        30.0, gt=0, description="Consumer-group session timeout. The local stack lowers it (group joins wait for it)."
    )
    heartbeat_interval_s: float = Field(3.0, gt=0, description="Consumer-group heartbeat interval.")
    commit_interval_s: float = Field(1.0, gt=0, description="How often workers commit processed offsets.")
    request_timeout_s: float = Field(30.0, gt=0, description="Broker request timeout.")
    fetch_max_wait_ms: int = Field(
        100,
        ge=1,
        le=30_000,
        description="Longest a worker's fetch waits at the broker. It bounds verdict latency: a partition the "
        "worker just drained is fetched again only after the fetch in flight returns (Faust's own value is 1500).",
    )

    def topic(self, name: str) -> str:
        """The full topic name for one of the ``*_topic`` fields' values."""
        return f"{self.topic_prefix}{name}"

    @property
    def all_topics(self) -> list[str]:
        return [
            self.topic(t)
            for t in (
                self.incoming_topic,
                self.escalations_topic,
                self.review_topic,
                self.verdicts_topic,
                self.deadletter_topic,
                self.decisions_topic,
                self.shadow_topic,
            )
        ]


class RedisSettings(_Section):
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL for visibility, idempotency and claims.")
    password: SecretStr | None = Field(None, description="Redis password, if the server needs one.")
    key_prefix: str = Field("modpipe:", description="Prefix for every key the pipeline writes.")
    verdict_ttl_s: int = Field(
        30 * 24 * 3600, gt=0, description="How long idempotency records and verdicts are kept (replay window)."
    )


class TritonSettings(_Section):
    grpc_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint (host:port) used for generate calls.")
    http_url: str = Field(
        "127.0.0.1:8000",
        description="Triton HTTP endpoint (host:port) for health checks (the reasoning worker checks its model).",
    )
    reasoner_model: str = Field(
        "safeguard_standin_cpu",
        description="Triton model that reasons over policies: gpt-oss-safeguard-20b/-120b in production, "
        "the CPU stand-in locally.",
    )
    request_timeout_s: float = Field(
        300.0, gt=0, description="Timeout for one generate call; must cover the high-effort budget at the server's "
        "per-sequence decode speed (16k tokens at ~60 tokens/s under load is ~270 s).",
    )
    max_in_flight: int = Field(32, ge=1, description="Concurrent generate calls per reasoning worker.")
    max_attempts: int = Field(3, ge=1, description="Attempts per call on retryable errors before review.")
    backoff_initial_s: float = Field(0.2, gt=0, description="First retry delay; doubles per attempt.")
    backoff_max_s: float = Field(5.0, gt=0, description="Upper bound for one retry delay.")


class TriageSettings(_Section):
    model_dir: Path = Field(
        PROJECT_ROOT / "triage_models" / "artifacts" / "current",
        description="Folder of the trained triage artefact (heads, thresholds, model card).",
    )
    batch_size: int = Field(32, ge=1, description="Most messages embedded together; the triage agent takes up to two "
                            "such batches at once and embeds the second while the first one's verdicts are published.")
    batch_within_s: float = Field(0.05, gt=0, description="Longest wait to fill a batch.")
    max_text_chars: int = Field(20_000, ge=1, description="Longer texts are dead-lettered as too large.")
    embedder: str = Field(
        "onnx-int8",
        pattern="^(onnx-int8|torch|triton)$",
        description="Embedder backend: onnx-int8 (in process, the project's int8 ONNX model), torch "
        "(sentence-transformers float32, the reference) or triton (the triton_embedder_model on the Triton server).",
    )
    max_seq_length: int = Field(256, ge=8, le=512, description="Tokens per text the embedder reads (rest truncated).")
    embedder_threads: int = Field(
        0, ge=0, description="onnx-int8: texts embedded in parallel (one core each); 0 uses every available core."
    )
    embedding_cache_size: int = Field(4096, ge=0, description="LRU cache of embeddings of repeated texts; 0 disables.")
    embedder_token_budget: int = Field(
        0, ge=0, description="onnx-int8: tokens per ONNX Runtime call; 0 runs one text per call, so a score never "
        "depends on its batch-mates (int8 activation scales are per call).",
    )
    triton_embedder_model: str = Field(
        "minilm_embedder", description="Triton model used when embedder is 'triton' (triton_repo/gpu/minilm_embedder)."
    )
    prior_mode: Literal["off", "fixed", "adaptive"] = Field(
        "adaptive",
        description="Prior-shift correction of triage scores: adaptive (EM estimate of the live violation rate over "
        "recent traffic, bounded), fixed (prior_fixed, e.g. the rate `modpipe triage prior` measured on final "
        "verdicts) or off (scores keep the training base rate).",
    )
    prior_fixed: float | None = Field(
        None, gt=0, lt=1, description="The live violation rate for prior_mode=fixed (the `any` head; categories scale)."
    )
    prior_min: float = Field(
        0.02, gt=0, lt=1, description="Lowest violation rate the adaptive prior may reach (EM on a model's own scores "
        "underestimates rare violations; the floor keeps that bounded)."
    )
    prior_max: float = Field(0.5, gt=0, lt=1, description="Highest violation rate the adaptive prior may reach.")
    prior_window: int = Field(2000, ge=10, description="Recent items the adaptive prior is estimated over.")
    prior_min_items: int = Field(
        500, ge=1, description="Items a worker must have scored before the adaptive prior moves from the training rate."
    )
    prior_update_every: int = Field(100, ge=1, description="Items between re-estimates of the adaptive prior.")
    prior_miss_budget: float = Field(
        0.2, gt=0, le=1, description="With a prior correction, the allow level is lowered so that auto-allowed items "
        "hold at most this share of the expected violations in recent traffic (1 disables the cap; at low base rates "
        "accuracy alone lets many violations through)."
    )
    language_gate: bool = Field(
        True, description="Escalate (never auto-decide) texts detected in a language the triage artefact was not "
        "validated on (thresholds.json `languages`)."
    )


class ReasonerSettings(_Section):
    policies_dir: Path = Field(PROJECT_ROOT / "policies", description="Folder with one sub-folder per policy.")
    first_effort: str = Field("low", pattern="^(low|medium|high)$", description="Reasoning effort of the first call.")
    escalated_effort: str = Field(
        "high", pattern="^(low|medium|high)$", description="Effort used when the first answer is not good enough."
    )
    min_confidence: float = Field(
        0.6, ge=0, le=1, description="Answers below this self-reported confidence go to the next effort, then review."
    )
    backend: Literal["triton", "openai", "ollama"] = Field(
        "triton",
        description="Where the reasoning model runs: Triton (decoupled generate, harmony rendered by modpipe), an "
        "OpenAI-compatible chat endpoint (vLLM serve, LM Studio, Ollama's /v1) or Ollama's native /api/chat.",
    )
    openai_base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="Base URL of the OpenAI-compatible endpoint (backend=openai)."
    )
    openai_model: str = Field("openai/gpt-oss-safeguard-20b", description="Model name sent to that endpoint.")
    openai_api_key: SecretStr | None = Field(None, description="Bearer token for that endpoint, if it needs one.")
    ollama_url: str = Field(
        "http://127.0.0.1:11434", description="Base URL of the Ollama server (backend=ollama; native /api/chat)."
    )
    ollama_model: str = Field("gpt-oss-safeguard:20b", description="Model name sent to Ollama.")
    max_tokens_low: int = Field(
        4096, ge=16, description="Output-token budget of a low-effort call (analysis and answer together)."
    )
    max_tokens_medium: int = Field(8192, ge=16, description="Output-token budget of a medium-effort call.")
    max_tokens_high: int = Field(
        16384, ge=16, description="Output-token budget of a high-effort call (the guide: lower the effort rather "
        "than cap the output; high effort can reason for thousands of tokens).",
    )
    truncation_retry_factor: float = Field(
        2.0, ge=1.0, description="A truncated answer is asked once more with this many times its budget (within "
        "the context), then goes to review as truncated.",
    )
    max_model_len: int = Field(
        32768, ge=256, description="Context window of the served model (vLLM max_model_len, Ollama num_ctx, the "
        "LM Studio context length): prompt plus output budget must fit, or the content is cut (recorded on the call).",
    )
    logprobs: int = Field(
        5, ge=0, le=20, description="Alternatives per output token asked of the backend (vLLM logprobs, OpenAI and "
        "Ollama top_logprobs) to compute the verdict's probability; 0 asks for none.",
    )
    breaker_failures: int = Field(
        5, ge=1, description="Consecutive failed calls (after retries) that open the circuit breaker."
    )
    breaker_reset_s: float = Field(
        30.0, gt=0, description="How long an open breaker fails calls fast before letting one trial call through."
    )
    cache_enabled: bool = Field(True, description="Keep answers in the Redis verdict cache (text hash, policy, effort).")
    cache_ttl_s: int = Field(7 * 24 * 3600, gt=0, description="How long a cached answer is reused.")
    analysis_max_chars: int = Field(
        4000, ge=0, description="Chain of thought kept per call as reviewer evidence (longer is cut in the middle)."
    )
    triage_confident_above: float = Field(
        0.9, ge=0, le=1, description="A triage violation score this high makes a 'no violation' answer a contradiction."
    )
    triage_confident_below: float = Field(
        0.1, ge=0, le=1, description="A triage violation score this low makes a 'violation' answer a contradiction."
    )

    def max_tokens_for(self, effort: str) -> int:
        """The output budget of a call at ``effort`` (low, medium or high)."""
        return {"low": self.max_tokens_low, "medium": self.max_tokens_medium, "high": self.max_tokens_high}[
            str(getattr(effort, "value", effort))
        ]


class LifecycleSettings(_Section):
    refresh_s: float = Field(
        2.0, gt=0, description="How often workers re-read which policy version enforces and which are shadowed "
        "(a promotion or rollback takes effect within this, without a restart)."
    )
    shadow_sample: float = Field(
        0.1, ge=0, le=1, description="Share of eligible live items judged by a shadowed version, unless `modpipe "
        "policy shadow --sample` says otherwise (also for policies with enforcing = false)."
    )
    shadow_calls_per_s: float = Field(
        2.0, ge=0, description="Model calls per second one reasoning worker may spend on shadow judgements; an item "
        "over the budget is not shadowed (enforcement never waits for shadowing). 0 turns shadowing off."
    )
    shadow_max_in_flight: int = Field(
        8, ge=1, description="Shadow judgements one reasoning worker runs at once, on model-call slots of their own "
        "(never enforcement's); more are skipped, never queued."
    )
    min_golden_accuracy: float = Field(
        0.7, ge=0, le=1, description="Golden-set accuracy a candidate needs to be promoted, for policies whose "
        "metadata sets no [lifecycle] min_golden_accuracy."
    )
    retro_lookback_s: float = Field(
        86_400.0, gt=0, description="How far before `retroact --since` escalations are read for the texts of the "
        "items to re-judge (an item's escalation precedes its verdict)."
    )


class ReviewSettings(_Section):
    claim_ttl_s: int = Field(900, gt=0, description="How long a reviewer's claim on a task lasts.")
    host: str = Field("127.0.0.1", description="Address `modpipe review serve` binds.")
    port: int = Field(8480, ge=0, le=65535, description="Port `modpipe review serve` listens on.")
    url: str = Field(
        "http://127.0.0.1:8480", description="Base URL of the review service, for the `modpipe review` client commands."
    )
    token: SecretStr | None = Field(
        None, description="Access token the `modpipe review` client commands send (reviewer or admin)."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bootstrap admin token accepted by the review service (only its hash is kept in memory)."
    )
    session_ttl_s: int = Field(8 * 3600, gt=0, description="How long a web-page login session lasts.")
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port of the review service; 0 disables it.")


class HttpSettings(_Section):
    max_body_bytes: int = Field(
        16_384, ge=1024, description="Largest request body of the HTTP services (review, gateway); a bigger one is "
        "refused with 413 before it is read or parsed. Routes that carry an item (appeals, publishing) allow "
        "MODPIPE_TRIAGE__MAX_TEXT_CHARS x 6 bytes more, room for the longest text however JSON escapes it.",
    )
    login_per_minute: int = Field(
        10, ge=1, description="Login attempts per client address per minute (bursts of as many); more get 429."
    )
    auth_failures_per_minute: int = Field(
        30, ge=1, description="Failed authentications (unknown token or session) per client address per minute; "
        "past it the client gets 429 and no credential it sends is checked until the budget refills.",
    )
    trusted_proxies: str = Field(
        "127.0.0.1", description="Comma-separated addresses (or *) of reverse proxies whose X-Forwarded-For names "
        "the client (uvicorn's forwarded_allow_ips); rate limits count per client address, so set it to the "
        "ingress or load balancer, never * on a port clients reach directly.",
    )


class WorkerSettings(_Section):
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port for a worker; 0 disables it.")
    log_level: str = Field("INFO", description="Python log level for workers.")
    outage_backoff_max_s: float = Field(
        5.0, gt=0, description="Longest pause between two tries while a dependency (Redis, the broker) is down."
    )
    stall_exit_s: float = Field(
        300.0, gt=0, description="A worker that cannot make progress this long (a dependency still down, or work "
        "waiting on its partitions while nothing moves) exits non-zero without acknowledging, so its supervisor "
        "restarts it; also bounds how long start-up may wait for Redis and the broker.",
    )
    monitor_interval_s: float = Field(
        5.0, gt=0, description="How often a worker measures its consumer lag and checks its committed offsets "
        "against the log (offsets past a topic's end are reset to the log start)."
    )


class LimitsSettings(_Section):
    max_message_bytes: int = Field(
        1_048_576, ge=1024, description="Message values larger than this are dead-lettered before decoding."
    )
    max_json_depth: int = Field(
        32, ge=2, description="Deepest JSON nesting (objects and arrays) a message may have; deeper is dead-lettered."
    )
    max_key_bytes: int = Field(1024, ge=1, description="Message keys longer than this are dead-lettered.")
    dead_letter_raw_bytes: int = Field(
        65_536, ge=0, description="Value bytes a dead letter keeps (the rest is cut; its length and sha256 stay), so "
        "every dead letter fits the broker's message limit."
    )
    max_attempts: int = Field(
        3, ge=1, description="Deliveries of one record that crashed its worker (process died mid-record) before "
        "the record is dead-lettered as a crash loop and the worker moves on; counted in Redis."
    )
    fetch_max_bytes: int = Field(
        8_388_608, ge=65_536, description="Bytes a worker's fetch asks for per partition. A record larger than this "
        "still comes back whole, alone (Kafka >= 0.10.1 and Tansu never let one record block a partition), and is "
        "dead-lettered by max_message_bytes."
    )
    reasoning_backlog: int = Field(
        2000, ge=1, description="Escalations waiting for the reasoning role beyond which the pipeline reports a "
        "backlog (modpipe status, the modpipe_backlog_exceeded metric, the Redis lag record a gateway reads)."
    )


class GatewaySettings(_Section):
    host: str = Field("127.0.0.1", description="Address `modpipe gateway serve` binds.")
    port: int = Field(8490, ge=0, le=65535, description="Port `modpipe gateway serve` listens on.")
    url: str = Field(
        "http://127.0.0.1:8490", description="Base URL of the gateway, for `modpipe publish --gateway`."
    )
    token: SecretStr | None = Field(
        None, description="Platform token that `modpipe publish --gateway` sends (a review-service platform token)."
    )
    max_batch_items: int = Field(
        100, ge=1, le=10_000, description="Most items in one POST /v1/items batch (and inputs in one /v1/moderations)."
    )
    max_batch_bytes: int = Field(
        4_194_304, ge=65_536, description="Largest body of POST /v1/items and /v1/moderations (413 beyond it, unread); "
        "never less than one item with the longest text (MODPIPE_HTTP__MAX_BODY_BYTES + 6 x max_text_chars).",
    )
    max_triage_lag: int = Field(
        10_000, ge=1, description="Messages on content.incoming not yet committed by the triage consumer group above "
        "which new items get 429 with Retry-After (duplicates are still answered).",
    )
    lag_refresh_s: float = Field(
        2.0, gt=0, description="How often a gateway replica re-reads the triage lag (the workers' Redis lag record, "
        "else the broker's committed offsets).",
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After (seconds) of a 429 for backpressure and of a 503.")
    moderate_deadline_ms: int = Field(
        2000, ge=0, description="How long POST /v1/moderate and /v1/moderations wait for a final verdict by default."
    )
    max_deadline_ms: int = Field(
        10_000, ge=0, description="The longest wait a caller may ask for (deadline_ms); longer asks are cut to it."
    )
    poll_interval_ms: int = Field(
        100, ge=5, description="Longest pause between two looks at the visibility store while a request waits."
    )
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port of the gateway; 0 disables it.")


class WebhookSettings(_Section):
    signing_key: SecretStr | None = Field(
        None, description="Key every platform's webhook secret is derived from (HMAC-SHA256 of the platform and its "
        "registration id): Redis never holds a secret. Needed by `modpipe webhooks add` and the deliverer.",
    )
    timeout_s: float = Field(5.0, gt=0, description="Timeout of one delivery attempt (connect, send and answer).")
    max_attempts: int = Field(
        8, ge=1, description="Attempts per delivery before it is dead-lettered (the content id is then parked)."
    )
    backoff_initial_s: float = Field(1.0, gt=0, description="Delay before the second attempt; doubles per attempt.")
    backoff_max_s: float = Field(60.0, gt=0, description="Upper bound for one delay between attempts.")
    concurrency: int = Field(64, ge=1, description="Delivery requests in flight per deliverer process.")
    max_pending: int = Field(
        10_000, ge=1, description="Verdicts a deliverer holds undelivered before it stops fetching more (backpressure)."
    )
    suspend_after: int = Field(
        3, ge=1, description="Consecutive dead-lettered deliveries after which a platform is suspended: its new "
        "deliveries are parked at once, and one probe attempt is made every probe_interval_s.",
    )
    probe_interval_s: float = Field(30.0, gt=0, description="How often a suspended platform's endpoint is probed.")
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port of the deliverer; 0 disables it.")


class Settings(BaseSettings):
    """The effective configuration of one modpipe process."""

    model_config = SettingsConfigDict(
        env_prefix="MODPIPE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    state_dir: Path = Field(default_factory=default_state_dir, description="Local stack state, PIDs and logs.")
    datasets_dir: Path = Field(
        PROJECT_ROOT.parent / "shared" / "datasets",
        description="Folder of the shared labelled data sets (openai_moderation/, xstest/, hatecheck/, ...), read "
        "in place by triage training and evaluation, the accuracy bench and `modpipe policy test` (golden "
        "references); the project never copies them. Workers do not read it.",
    )
    kafka: KafkaSettings = Field(default_factory=KafkaSettings, description="Broker and topics.")
    redis: RedisSettings = Field(default_factory=RedisSettings, description="Redis store.")
    triton: TritonSettings = Field(default_factory=TritonSettings, description="Triton inference server.")
    triage: TriageSettings = Field(default_factory=TriageSettings, description="Triage classifier.")
    reasoner: ReasonerSettings = Field(default_factory=ReasonerSettings, description="Policy reasoning.")
    review: ReviewSettings = Field(default_factory=ReviewSettings, description="Human review.")
    lifecycle: LifecycleSettings = Field(
        default_factory=LifecycleSettings, description="Policy lifecycle: shadow, promotion, retroaction."
    )
    http: HttpSettings = Field(
        default_factory=HttpSettings, description="Request limits of the HTTP services (review, gateway)."
    )
    gateway: GatewaySettings = Field(default_factory=GatewaySettings, description="The HTTP gateway.")
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings, description="Webhook delivery.")
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="Worker processes.")
    limits: LimitsSettings = Field(
        default_factory=LimitsSettings, description="Limits at the edge, crash loops and backlog bounds."
    )

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with secrets shown as ``**********``."""
        return self.model_dump(mode="json")


def settings_rows(model: type[BaseModel] = Settings, prefix: str = "MODPIPE_") -> list[tuple[str, str, str]]:
    """(environment variable, default, description) for every setting, sections expanded, in declaration order.

    The README's settings table is this list (``modpipe config show --markdown``; a unit test holds them equal), so
    the documentation cannot drift from the code.
    """
    rows: list[tuple[str, str, str]] = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, _Section):
            rows.extend(settings_rows(annotation, f"{prefix}{name.upper()}__"))
            continue
        if name == "state_dir":
            default = ".modpipe"  # its factory reads MODPIPE_STATE_DIR: document the default, not this process's value
        elif field.default_factory is not None:
            default = str(field.default_factory())  # type: ignore[call-arg]
        else:
            default = "(none)" if field.default is None else str(field.default)
        if isinstance(field.default, Path):
            try:
                default = field.default.relative_to(PROJECT_ROOT).as_posix()
            except ValueError:
                default = os.path.relpath(field.default, PROJECT_ROOT)
        rows.append((f"{prefix}{name.upper()}", default or "(empty)", field.description or ""))
    return rows


def settings_table() -> str:
    """The settings as the Markdown table the README holds."""
    lines = ["| variable | default | what |", "|---|---|---|"]
    lines += [f"| `{var}` | `{default}` | {description} |" for var, default, description in settings_rows()]
    return "\n".join(lines)


def stack_env_file(state_dir: Path | None = None) -> Path:
    return (state_dir or default_state_dir()) / "stack.env"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings: explicit overrides > environment > local ``stack.env`` > defaults."""
    env_file = stack_env_file()
    return Settings(_env_file=env_file if env_file.exists() else None, **overrides)
