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
        "moderation.decisions", description="Audit log of reviewer actions (decisions, escalations, appeals)."
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
    request_timeout_s: float = Field(60.0, gt=0, description="Timeout for one generate call.")
    max_in_flight: int = Field(32, ge=1, description="Concurrent generate calls per reasoning worker.")
    max_attempts: int = Field(3, ge=1, description="Attempts per call on retryable errors before review.")
    backoff_initial_s: float = Field(0.2, gt=0, description="First retry delay; doubles per attempt.")
    backoff_max_s: float = Field(5.0, gt=0, description="Upper bound for one retry delay.")


class TriageSettings(_Section):
    model_dir: Path = Field(
        PROJECT_ROOT / "triage_models" / "artifacts" / "current",
        description="Folder of the trained triage artefact (heads, thresholds, model card).",
    )
    batch_size: int = Field(32, ge=1, description="Most messages embedded together (Faust stream.take).")
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


class ReasonerSettings(_Section):
    policies_dir: Path = Field(PROJECT_ROOT / "policies", description="Folder with one sub-folder per policy.")
    first_effort: str = Field("low", pattern="^(low|medium|high)$", description="Reasoning effort of the first call.")
    escalated_effort: str = Field(
        "high", pattern="^(low|medium|high)$", description="Effort used when the first answer is not good enough."
    )
    min_confidence: float = Field(
        0.6, ge=0, le=1, description="Answers below this self-reported confidence go to the next effort, then review."
    )
    backend: Literal["triton", "openai"] = Field(
        "triton",
        description="Where the reasoning model runs: Triton (decoupled generate, harmony rendered by modpipe) or an "
        "OpenAI-compatible chat endpoint (vLLM serve, Ollama, LM Studio).",
    )
    openai_base_url: str = Field(
        "http://127.0.0.1:8000/v1", description="Base URL of the OpenAI-compatible endpoint (backend=openai)."
    )
    openai_model: str = Field("openai/gpt-oss-safeguard-20b", description="Model name sent to that endpoint.")
    openai_api_key: SecretStr | None = Field(None, description="Bearer token for that endpoint, if it needs one.")
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


class WorkerSettings(_Section):
    metrics_port: int = Field(0, ge=0, description="Prometheus exporter port for a worker; 0 disables it.")
    log_level: str = Field("INFO", description="Python log level for workers.")


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
    worker: WorkerSettings = Field(default_factory=WorkerSettings, description="Worker processes.")

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with secrets shown as ``**********``."""
        return self.model_dump(mode="json")


def stack_env_file(state_dir: Path | None = None) -> Path:
    return (state_dir or default_state_dir()) / "stack.env"


def load_settings(**overrides: Any) -> Settings:
    """Build the settings: explicit overrides > environment > local ``stack.env`` > defaults."""
    env_file = stack_env_file()
    return Settings(_env_file=env_file if env_file.exists() else None, **overrides)
