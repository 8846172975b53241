"""``modpipe triage eval`` and the triage CLI/bench plumbing.

Why: the evaluation report is what an operator reads before trusting the thresholds; its numbers must be the
standard definitions, its plots real PNG files, and it must say when a data set was part of the training data.
Uses XSTest (450 short prompts, read from the shared datasets folder) with the real artefact and embedder, so it
stays fast. The demo's sample traffic is checked here too: the benches time the embedder on it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import Settings
from pipeline.harness.bench.triage import BEGIN, END, write_markdown
from pipeline.harness.traffic import sample_items, sample_posts, sample_texts
from pipeline.triage.eval import binary_metrics, evaluate, trade_off

pytestmark = pytest.mark.unit
DATASETS = Settings().datasets_dir  # the shared labelled data (MODPIPE_DATASETS_DIR), read in place

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def test_binary_metrics_follow_the_standard_definitions() -> None:
    p = np.array([0.9, 0.8, 0.3, 0.6, 0.1, 0.2])
    y = np.array([1, 1, 1, 0, 0, 0])
    m = binary_metrics(p, y)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["roc_auc"] == pytest.approx(8 / 9)
    assert binary_metrics(np.array([0.2, 0.7]), np.array([0, 0]))["roc_auc"] is None  # one class: undefined


def test_trade_off_escalates_more_for_higher_targets() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.4 * y + rng.uniform(0, 0.6, 500), 0, 1)
    points = trade_off(p, y)
    rates = [pt["escalation_rate"] for pt in points]
    assert rates == sorted(rates)
    assert all(pt["auto_accuracy"] >= pt["target"] for pt in points if pt["escalation_rate"] < 1.0)


@pytest.fixture(scope="module")
def xstest_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    plots = tmp_path_factory.mktemp("plots")
    return evaluate("xstest", datasets_dir=DATASETS, plots_dir=plots, progress=False), plots


def test_eval_on_a_trap_set_reports_every_number_and_plots(xstest_report: tuple[dict, Path]) -> None:
    report, plots = xstest_report
    for key in ("roc_auc", "pr_auc", "f1", "precision", "recall", "auto_accuracy", "escalation_rate", "per_category",
                "model_version", "trade_off"):
        assert key in report, key
    assert report["rows"] == 450 and report["positives"] == 200
    assert report["in_sample"] is False  # XSTest is not training data
    assert 0.5 < report["roc_auc"] <= 1.0 and 0.0 <= report["escalation_rate"] <= 1.0
    assert report["per_category"] == {}  # XSTest has no category labels
    assert [s["file"] for s in report["sources"]] == ["xstest/xstest_prompts.csv"]
    for path in report["plots"].values():
        assert Path(path).parent == plots and Path(path).read_bytes()[:8] == PNG_MAGIC


def test_eval_knows_when_it_scores_its_own_training_data() -> None:
    report = evaluate("openai_moderation", datasets_dir=DATASETS, progress=False)
    assert report["in_sample"] is True  # numbers on training rows are optimistic, and the report says so
    assert set(report["per_category"]) == {"S", "H", "V", "HR", "SH", "S3", "H2", "V2"}
    assert all("band" in m for m in report["per_category"].values())


def test_eval_reads_a_reviewer_feedback_file(tmp_path: Path) -> None:
    from triage_models.data import load_openai_moderation

    data = load_openai_moderation(DATASETS)
    rows = [{"text": t, "label": 0, "source": "review", "decided_at": "2025-01-01T00:00:00+00:00"}
            for t in data.texts[:30]]
    rows += [{"text": "I will find you and kill you tonight.", "label": 1, "categories": {"V": 1}}]
    path = tmp_path / "reviewed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = evaluate(str(path), datasets_dir=tmp_path / "not-needed-for-a-file", progress=False)
    assert report["dataset"] == "feedback" and report["rows"] == 31 and report["in_sample"] is False


def test_cross_validated_eval_on_a_binary_only_set(tmp_path: Path) -> None:
    report = evaluate("xstest", datasets_dir=DATASETS, cv=3, progress=False, plots_dir=tmp_path)
    assert report["mode"].startswith("3-fold")
    assert 0.5 < report["roc_auc"] <= 1.0
    assert report["per_category"] == {}
    assert Path(report["plots"]["escalation_vs_accuracy"]).read_bytes()[:8] == PNG_MAGIC


def test_cli_mounts_triage_and_bench_commands() -> None:
    result = runner.invoke(app, ["triage", "--help"])
    assert result.exit_code == 0
    assert all(cmd in result.output for cmd in ("train", "eval", "build-embedder"))
    result = runner.invoke(app, ["bench", "--help"])
    assert result.exit_code == 0 and "triage" in result.output


def test_cli_eval_writes_json_and_fails_clearly_on_unknown_data(tmp_path: Path) -> None:
    out = tmp_path / "eval.json"
    result = runner.invoke(app, ["triage", "eval", "--dataset", "xstest", "--json-out", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["dataset"] == "xstest" and (tmp_path / "triage-xstest-pr.png").is_file()
    result = runner.invoke(app, ["triage", "eval", "--dataset", "nope", "--json-out", str(out)])
    assert result.exit_code == 1


def test_cli_eval_without_the_datasets_folder_is_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    absent = tmp_path / "datasets"
    monkeypatch.setenv("MODPIPE_DATASETS_DIR", str(absent))
    result = runner.invoke(app, ["triage", "eval", "--dataset", "xstest", "--json-out", str(tmp_path / "e.json"),
                                 "--no-progress"])
    assert result.exit_code == 1
    assert "MODPIPE_DATASETS_DIR" in result.output and str(absent) in result.output.replace("\n", "")
    assert "Traceback" not in result.output and not (tmp_path / "e.json").exists()
    result = runner.invoke(app, ["triage", "train", "--out", str(tmp_path / "a"), "--no-progress"])
    assert result.exit_code == 1 and "MODPIPE_DATASETS_DIR" in result.output


def test_sample_traffic_is_seeded_repeats_and_mixes_benign_with_the_rest() -> None:
    posts = sample_posts()
    texts = [p["text"] for p in posts]
    assert len(texts) == len(set(texts)) >= 300
    kinds = {p["kind"] for p in posts}
    assert kinds == {"benign", "spam", "rude", "violating", "borderline"}
    assert 0.65 <= sum(p["kind"] == "benign" for p in posts) / len(posts) <= 0.80
    assert sample_texts(50, seed=3) == sample_texts(50, seed=3) != sample_texts(50, seed=4)
    many = sample_texts(len(texts) + 25, seed=1)  # more than the pool: repeats, same order again
    assert set(many) == set(texts) and many[len(texts):] == many[:25]
    unique = sample_texts(3 * len(texts) + 7, seed=1, distinct=True)  # benches: no repeat hits a cache
    assert len(set(unique)) == len(unique) and unique[: len(texts)] == many[: len(texts)]
    items = sample_items(3, "run", seed=3)
    assert [i.content_id for i in items] == ["run-000000", "run-000001", "run-000002"]
    assert [i.text for i in items] == sample_texts(3, seed=3)


def test_sample_traffic_is_written_for_the_project_not_copied() -> None:
    """No post is a row of the public sets the project reads (the project commits none of their text)."""
    from triage_models.data import load_hatecheck, load_openai_moderation, load_xstest

    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    public = {norm(t) for load in (load_openai_moderation, load_xstest, load_hatecheck) for t in load(DATASETS).texts}
    copied = [p["text"] for p in sample_posts() if norm(p["text"]) in public]
    assert copied == []


def test_bench_markdown_replaces_only_its_section(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- bench:spine:begin -->\nspine numbers\n<!-- bench:spine:end -->\n")
    report = {"measured_at": "now", "machine": "m", "texts": "t", "baseline": "b", "embedder": "e",
              "baseline_per_s": 1.0, "embedder_per_s": 4.0, "speedup": 4.0, "baseline_64_tokens_per_s": 2.0,
              "embedder_64_tokens_per_s": 7.0, "speedup_64_tokens": 3.5, "cached_repeat_per_s": 9.0,
              "baseline_auc": 0.89, "auc": 0.891, "auc_delta": 0.001, "cosine_to_baseline_mean": 0.95,
              "cosine_to_baseline_p01": 0.9}
    write_markdown(report, md)
    write_markdown(report | {"speedup": 5.0}, md)
    text = md.read_text()
    assert "spine numbers" in text and text.count(BEGIN) == 1 and text.count(END) == 1
    assert "**5.0x**" in text and "**4.0x**" not in text
