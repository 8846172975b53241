"""Monitoring files in deploy/: Prometheus' scrape config and rules, Grafana's provisioning and the modpipe dashboard.

A renamed metric does not break Prometheus or Grafana, it leaves an empty panel or an alert that never fires; so
besides the wiring (what compose mounts where, what is scraped) every ``modpipe_*`` series the rules and the
dashboard query is checked against :mod:`pipeline.metrics`, with :mod:`pipeline.deploy_check`'s own checks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import deploy_check

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
RULES_FILE = ROOT / "deploy" / "prometheus-rules.yml"
DASHBOARD_FILE = ROOT / "deploy" / "grafana" / "dashboards" / "modpipe.json"
GRAFANA_PROVISIONING = ROOT / "deploy" / "grafana" / "provisioning"

WORKER_ROLES = ("triage", "reasoning", "review-intake")

# What an operator needs to see to run the pipeline, and the series that carry it: without one of these panels a
# stall, a flood of dead letters or a growing review backlog goes unseen.
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


def test_prometheus_scrapes_workers_and_triton(services: dict[str, dict[str, Any]]) -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    assert any(str(v).startswith("./deploy/prometheus.yml:") for v in services["prometheus"]["volumes"])
    targets: list[str] = []
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets += [f"{n}:{sd['port']}" for n in sd["names"]]
        for sc in job.get("static_configs", []):
            targets += sc["targets"]
    for role in (*WORKER_ROLES, "review", "reasoning-cpu", "gateway", "webhooks"):
        assert f"{role}:9100" in targets
    assert "triton:8002" in targets and "triton-cpu:8002" in targets
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]
    assert any(str(v).startswith("./deploy/prometheus-rules.yml:/etc/prometheus/rules.yml") for v in services["prometheus"]["volumes"])
    # Unique job names (Prometheus refuses a config with two jobs of one name).
    config_check, _ = deploy_check.check_prometheus(PROMETHEUS_FILE, RULES_FILE)
    assert config_check.ok, config_check.detail


def test_prometheus_rules_query_only_defined_metrics(tmp_path: Path) -> None:
    _, rules_check = deploy_check.check_prometheus(PROMETHEUS_FILE, RULES_FILE)
    assert rules_check.ok, rules_check.detail
    rules = yaml.safe_load(RULES_FILE.read_text())
    rules["groups"][0]["rules"].append({"alert": "Nope", "expr": "rate(modpipe_nope_total[5m]) > 0"})
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    _, result = deploy_check.check_prometheus(PROMETHEUS_FILE, tmp_path / "rules.yml")
    assert not result.ok and "modpipe_nope_total" in result.detail


def test_grafana_is_provisioned_with_the_dashboard(services: dict[str, dict[str, Any]]) -> None:
    grafana = services["grafana"]
    mounts = [str(v) for v in grafana["volumes"]]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    assert "./deploy/grafana/dashboards:/var/lib/grafana/dashboards:ro" in mounts
    # Only the long form of depends_on carries a condition.
    assert grafana["depends_on"]["prometheus"]["condition"] == "service_healthy"
    datasource = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "prometheus.yml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "modpipe.yml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads(DASHBOARD_FILE.read_text())
    uids = {t["datasource"]["uid"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]}
    assert uids == {datasource["uid"]}


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
