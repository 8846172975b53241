"""The helm chart (helm/modpipe): its values, and what Helm's own engine renders from them.

Rendering, linting and schema validation go through :mod:`pipeline.deploy_check` (Helm's Go SDK via
``helm-python-sdk``, ``kubernetes-validate`` for the Kubernetes OpenAPI schemas, the vendored CRD schemas for KEDA
and the Prometheus Operator), the code ``modpipe deploy check`` runs; the tests then assert what the rendered
objects say. Renders are shared per value set (the ``render`` fixture in conftest.py).
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import pytest
import yaml

from pipeline import deploy_check
from pipeline.config import KafkaSettings

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "helm" / "modpipe"
CRD_DIR = ROOT / "deploy" / "crd-schemas"

WORKER_ROLES = ("triage", "reasoning", "review-intake")
K8S_VERSION = "1.30.0"
SECRET_NAME = "modpipe-redis"
SECRETS_DIR = "/etc/modpipe/secrets"
# The one value the chart cannot default: which Secret holds the Redis password.
BASE_VALUES: dict[str, Any] = {"redis": {"auth": {"existingSecret": SECRET_NAME}}}

Render = Callable[[dict[str, Any]], list[dict[str, Any]]]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deploy: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = deploy["spec"]["template"]["spec"]["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


# ------------------------------------------------------------------------------------------------ static


@pytest.fixture(scope="module")
def chart_values() -> dict[str, Any]:
    return yaml.safe_load((CHART_DIR / "values.yaml").read_text())


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "modpipe"
    assert chart["type"] == "application"
    for name in ("_helpers.tpl", "NOTES.txt", "configmap.yaml", "workers.yaml", "review.yaml", "triton.yaml",
                 "gateway.yaml", "webhooks.yaml"):
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


# ------------------------------------------------------------------------------------------------ rendered


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
    assert deploy_check.lint_chart(CHART_DIR, values, K8S_VERSION) == []


@VALUE_SETS
def test_rendered_manifests_match_the_kubernetes_schemas(
    render: Render, crd_schemas: dict[tuple[str, str], dict[str, Any]], values: dict[str, Any]
) -> None:
    """Strictly, as the API server validates: Kubernetes' schemas, the vendored CRD schemas, no two objects alike."""
    assert deploy_check.first_invalid_object(render(values), K8S_VERSION, crd_schemas) is None


def test_two_objects_with_the_same_kind_and_name_are_refused(
    render: Render, crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    config_map = _by_kind(render(BASE_VALUES), "ConfigMap")["demo-modpipe-config"]
    problem = deploy_check.first_invalid_object([config_map, config_map], K8S_VERSION, crd_schemas)
    assert problem == "two objects named ConfigMap/demo-modpipe-config"


def test_rendered_defaults(render: Render, chart_values: dict[str, Any], settings_env_names: set[str]) -> None:
    docs = render(BASE_VALUES)
    deployments = _by_kind(docs, "Deployment")
    # Workers: one Deployment per role, replicas from values, metrics port and probes.
    for key, worker in chart_values["workers"].items():
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
    assert set(review_env) <= settings_env_names
    for probe in ("livenessProbe", "readinessProbe"):
        assert rc[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    svc = _by_kind(docs, "Service")["demo-modpipe-review"]
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("http", 8080), ("metrics", 9100)}
    assert svc["spec"]["selector"].items() <= review["spec"]["template"]["metadata"]["labels"].items()
    # A PodDisruptionBudget per worker role and for the review service, selecting exactly their pods.
    pdbs = _by_kind(docs, "PodDisruptionBudget")
    assert set(pdbs) == {*(f"demo-modpipe-worker-{r}" for r in WORKER_ROLES), "demo-modpipe-review",
                         "demo-modpipe-gateway"}
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
    assert set(cm) <= settings_env_names
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


def test_rendered_with_everything_on(render: Render) -> None:
    docs = render(ALL_ON)
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
        "demo-modpipe-gateway",
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


def test_rendered_with_external_triton(render: Render) -> None:
    docs = render(EXTERNAL_TRITON)
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
def test_render_refuses_incomplete_values(chart: helm.Chart, values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values, name="demo", namespace="moderation")


# ------------------------------------------------------------------------------------------------ values schema


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
def test_values_schema_rejects_unknown_keys_and_bad_values(
    chart: helm.Chart, values: dict[str, Any], where: str
) -> None:
    with pytest.raises(helm.HelmError, match=where):
        chart.validate_schema(values)
    # `helm install`/`template` enforce the schema too: the typo never reaches the cluster.
    with pytest.raises(helm.HelmError, match="schema"):
        chart.render(values, name="demo", namespace="moderation")


def test_values_schema_is_closed_everywhere_but_kubernetes_fragments(
    chart: helm.Chart, chart_values: dict[str, Any]
) -> None:
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
    chart.validate_schema(chart_values)


# ------------------------------------------------------------------------------------------------ KEDA autoscaling


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


def test_keda_scales_triage_and_reasoning_on_consumer_lag(
    render: Render, crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    docs = render(KEDA_ON)
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
    for so in scaled.values():
        deploy_check.validate_crd_object(so, crd_schemas[("keda.sh/v1alpha1", "ScaledObject")])


def test_vendored_crd_schemas_reject_what_the_api_server_would(
    render: Render, crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    assert set(crd_schemas) == {("keda.sh/v1alpha1", "ScaledObject"), ("monitoring.coreos.com/v1", "ServiceMonitor")}
    so = _by_kind(render(KEDA_ON), "ScaledObject")["demo-modpipe-worker-triage"]
    bad_type = json.loads(json.dumps(so))
    bad_type["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 500  # KEDA wants strings
    unknown = json.loads(json.dumps(so))
    unknown["spec"]["maxReplicas"] = 3  # the field is maxReplicaCount
    for doc in (bad_type, unknown):
        with pytest.raises(jsonschema.ValidationError):
            deploy_check.validate_crd_object(doc, crd_schemas[("keda.sh/v1alpha1", "ScaledObject")])


def test_keda_max_replicas_beyond_partitions_is_refused(chart: helm.Chart) -> None:
    values = _merge(KEDA_ON, {"kafka": {"partitions": 4}})
    with pytest.raises(helm.HelmError, match="exceeds kafka.partitions"):
        chart.render(values, name="demo", namespace="moderation")


# ------------------------------------------------------------------------------------------------ ingress, secrets, triton


def test_review_ingress_is_optional_and_routes_to_the_review_service(render: Render) -> None:
    values = _merge(
        BASE_VALUES,
        {"review": {"ingress": {"enabled": True, "className": "nginx",
                                "hosts": [{"host": "review.example.org", "paths": [{"path": "/", "pathType": "Prefix"}]}],
                                "tls": [{"secretName": "review-tls", "hosts": ["review.example.org"]}]}}},
    )
    ingress = _by_kind(render(values), "Ingress")["demo-modpipe-review"]
    assert ingress["spec"]["ingressClassName"] == "nginx"
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "review.example.org"
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "demo-modpipe-review", "port": {"name": "http"}}
    assert ingress["spec"]["tls"][0]["secretName"] == "review-tls"


def test_trial_secret_from_values_is_mounted_as_a_file(render: Render) -> None:
    values = {"redis": {"auth": {"password": "trial-only"}}, "secretFiles": {"reviewAdminTokenSecret": "review-admin"}}
    docs = render(values)
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


def test_secret_file_entrypoint_really_exports_the_files(render: Render, tmp_path: Path) -> None:
    """Run the rendered entrypoint with /bin/sh: the files become the variables modpipe reads, then modpipe runs."""
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    values = _merge(BASE_VALUES, {"secretFiles": {"mountPath": str(secrets)}})
    container = _container(_by_kind(render(values), "Deployment")["demo-modpipe-worker-reasoning"])
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


def test_triton_with_several_replicas_rolls_one_gpu_at_a_time(render: Render) -> None:
    docs = render(_merge(BASE_VALUES, {"triton": {"replicaCount": 3}}))
    triton = _by_kind(docs, "Deployment")["demo-modpipe-triton"]
    assert triton["spec"]["replicas"] == 3
    assert triton["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert "demo-modpipe-triton" in _by_kind(docs, "PodDisruptionBudget")


# ------------------------------------------------------------------------------------------------ the chart check


@pytest.mark.parametrize("example", sorted(p.name for p in (CHART_DIR / "examples").glob("*.yaml")))
def test_example_values_render_and_validate(render: Render, example: str) -> None:
    values = yaml.safe_load((CHART_DIR / "examples" / example).read_text())
    result = deploy_check.check_chart(CHART_DIR, values, example, K8S_VERSION, CRD_DIR)
    assert result.ok, result.detail
    docs = render(values)
    deployments = _by_kind(docs, "Deployment")
    assert {f"demo-modpipe-worker-{r}" for r in WORKER_ROLES} <= set(deployments)
    if example == "values-large.yaml":
        assert set(_by_kind(docs, "ScaledObject")) == {"demo-modpipe-worker-triage", "demo-modpipe-worker-reasoning",
                                                       "demo-modpipe-webhooks"}
        assert set(_by_kind(docs, "HorizontalPodAutoscaler")) == {"demo-modpipe-gateway"}
        assert "Ingress" in {d["kind"] for d in docs} and "ServiceMonitor" in {d["kind"] for d in docs}


def test_deploy_check_fails_loudly_on_a_broken_chart(tmp_path: Path) -> None:
    broken = tmp_path / "modpipe"
    shutil.copytree(CHART_DIR, broken)
    workers = broken / "templates" / "workers.yaml"
    workers.write_text(workers.read_text().replace("revisionHistoryLimit: 5", "revisionHistoryLimt: 5"))
    result = deploy_check.check_chart(broken, BASE_VALUES, "defaults", K8S_VERSION, CRD_DIR)
    assert not result.ok and "revisionHistoryLimt" in result.detail


# ------------------------------------------------------------------------------------------------ the front doors


WEBHOOKS_ON = _merge(BASE_VALUES, {"secretFiles": {"webhookSigningKeySecret": "modpipe-webhooks"},
                                   "webhooks": {"enabled": True}})


def test_the_gateway_is_its_own_deployment_and_service_with_the_review_tokens_store(
    render: Render, settings_env_names: set[str]
) -> None:
    docs = render(BASE_VALUES)
    dep = _by_kind(docs, "Deployment")["demo-modpipe-gateway"]
    assert dep["spec"]["replicas"] == 2
    c = _container(dep)
    assert c["args"] == ["gateway", "serve"]
    env = {e["name"]: e["value"] for e in c["env"]}
    assert env == {"MODPIPE_GATEWAY__HOST": "0.0.0.0", "MODPIPE_GATEWAY__PORT": "8090",
                   "MODPIPE_GATEWAY__METRICS_PORT": "9100"}
    assert set(env) <= settings_env_names
    assert c["envFrom"] == [{"configMapRef": {"name": "demo-modpipe-config"}}]
    _assert_secret_files(dep, c)
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    svc = _by_kind(docs, "Service")["demo-modpipe-gateway"]
    assert {(p["name"], p["port"]) for p in svc["spec"]["ports"]} == {("http", 8090), ("metrics", 9100)}
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    # Off by default: the HPA, the Ingress and the webhook deliverer (it needs a signing key Secret).
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in docs}
    assert "demo-modpipe-webhooks" not in _by_kind(docs, "Deployment")


def test_the_gateway_scales_on_cpu_and_takes_an_ingress(render: Render) -> None:
    values = _merge(BASE_VALUES, {"gateway": {
        "autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 9, "targetCPUUtilizationPercentage": 60},
        "ingress": {"enabled": True, "className": "nginx",
                    "hosts": [{"host": "api.example.org", "paths": [{"path": "/v1", "pathType": "Prefix"}]}]}}})
    docs = render(values)
    dep = _by_kind(docs, "Deployment")["demo-modpipe-gateway"]
    assert "replicas" not in dep["spec"], "the HPA owns the replica count"
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")["demo-modpipe-gateway"]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "demo-modpipe-gateway"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 9)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 60
    rule = _by_kind(docs, "Ingress")["demo-modpipe-gateway"]["spec"]["rules"][0]
    assert rule["http"]["paths"][0]["backend"]["service"] == {"name": "demo-modpipe-gateway", "port": {"name": "http"}}


def test_the_webhook_deliverer_alone_gets_the_signing_key_and_scales_on_its_group_lag(render: Render) -> None:
    values = _merge(WEBHOOKS_ON, {"kafka": {"topicPrefix": "eu1."}, "webhooks": {"autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 6, "lagThreshold": 200}}})
    docs = render(values)
    deployments = _by_kind(docs, "Deployment")
    dep = deployments["demo-modpipe-webhooks"]
    c = _container(dep)
    assert c["args"] == ["webhooks", "deliver"]
    assert {e["name"]: e["value"] for e in c["env"]} == {"MODPIPE_WEBHOOKS__METRICS_PORT": "9100"}
    assert {"name": "metrics", "containerPort": 9100, "protocol": "TCP"} in c["ports"]
    assert c["startupProbe"]["httpGet"]["port"] == "metrics"
    assert f"{SECRETS_DIR}/webhook-signing-key" in c["command"][2]

    def secret_names(deploy: dict[str, Any]) -> set[str]:
        volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == "secrets")
        return {s["secret"]["name"] for s in volume["projected"]["sources"]}

    assert secret_names(dep) == {SECRET_NAME, "modpipe-webhooks"}
    for name, other in deployments.items():
        if name not in ("demo-modpipe-webhooks", "demo-modpipe-triton"):
            assert "modpipe-webhooks" not in secret_names(other), name
    so = _by_kind(docs, "ScaledObject")["demo-modpipe-webhooks"]
    trigger = so["spec"]["triggers"][0]["metadata"]
    assert (trigger["consumerGroup"], trigger["topic"]) == ("eu1.modpipe-webhooks", "eu1.moderation.verdicts")
    assert trigger["lagThreshold"] == "200" and "replicas" not in dep["spec"]
    assert "demo-modpipe-webhooks" in _by_kind(docs, "PodDisruptionBudget")
    assert "demo-modpipe-webhooks-metrics" in _by_kind(docs, "Service")


def test_the_webhook_deliverer_is_refused_without_its_key_or_beyond_the_partitions(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmError, match="webhookSigningKeySecret"):
        chart.render(_merge(BASE_VALUES, {"webhooks": {"enabled": True}}), name="demo", namespace="moderation")
    too_many = _merge(WEBHOOKS_ON, {"kafka": {"partitions": 2}, "webhooks": {"autoscaling": {
        "enabled": True, "minReplicas": 1, "maxReplicas": 3}}})
    with pytest.raises(helm.HelmError, match="exceeds kafka.partitions"):
        chart.render(too_many, name="demo", namespace="moderation")


@pytest.mark.parametrize("values", [WEBHOOKS_ON], ids=["webhooks-on"])
def test_front_door_renders_lint_and_validate(
    render: Render, crd_schemas: dict[tuple[str, str], dict[str, Any]], values: dict[str, Any]
) -> None:
    assert deploy_check.lint_chart(CHART_DIR, values, K8S_VERSION) == []
    assert deploy_check.first_invalid_object(render(values), K8S_VERSION, crd_schemas) is None


def test_the_entrypoint_exports_the_webhook_signing_key_file(render: Render, tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "redis-password").write_text("pw")
    (secrets / "webhook-signing-key").write_text("k3y")
    values = _merge(WEBHOOKS_ON, {"secretFiles": {"mountPath": str(secrets)}})
    container = _container(_by_kind(render(values), "Deployment")["demo-modpipe-webhooks"])
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "modpipe"
    fake.write_text('#!/bin/sh\nprintf "args=%s\\n" "$*"\nprintf "key=%s\\n" "$MODPIPE_WEBHOOKS__SIGNING_KEY"\n')
    fake.chmod(0o755)
    ran = subprocess.run([*container["command"], *container["args"]], env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=30)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["args=webhooks deliver", "key=k3y"]
