"""The replay simulation: days of a labelled stream, an oracle in the reasoner's place, a gated retrain each day.

Why: the simulation is how the learning loop is shown to work before it runs on real traffic; it must say that an
oracle stood in for the reasoner, retrain through the same promotion gate as ``modpipe triage retrain``, and plot
what it measured. A deterministic keyword embedder keeps it fast: this checks the procedure, not the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import triage_models.simulate as simulate_module
import triage_models.train as train_module
from pipeline.config import Settings
from triage_models.data import load_xstest
from triage_models.simulate import ORACLE_NOTE, plot, read_stream, simulate, write_stream

from test_triage_train import _KeywordEmbedder  # the same deterministic embedder as the training tests

pytestmark = pytest.mark.unit
DATASETS = Settings().datasets_dir


def test_stream_files_round_trip_and_refuse_bad_rows(tmp_path: Path) -> None:
    path = write_stream(tmp_path / "s.jsonl", ["a", "b"], [0, 1], "test")
    assert read_stream(path)[0] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": 3}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_stream(bad)


def test_simulation_replays_days_retrains_through_the_gate_and_plots(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_module, "make_embedder", lambda *a, **k: _KeywordEmbedder())
    monkeypatch.setattr(simulate_module, "make_embedder", lambda *a, **k: _KeywordEmbedder())
    start = tmp_path / "current"
    train_module.train(start, datasets_dir=DATASETS, progress=False, cache_dir=tmp_path / "cache", extra_sources=[],
                       nested=False)
    xs = load_xstest(DATASETS)
    y, rows = xs.any_labels()
    stream = write_stream(tmp_path / "stream.jsonl", [xs.texts[i] for i in rows], y, "xstest")
    report = simulate(stream, days=2, datasets_dir=DATASETS, model_dir=start, work_dir=tmp_path / "work",
                      cache_dir=tmp_path / "cache")
    assert report["oracle"] == ORACLE_NOTE and "oracle" in report["oracle"]
    first, second = report["days"]
    assert first["items"] + second["items"] == len(rows)
    assert first["learning_rows"] == first["escalated"] > 0
    assert set(first["retrain"]) == {"candidate_version", "promoted", "reason", "held_back_rows"}
    assert "retrain" not in second  # nothing to retrain for after the last day
    if not first["retrain"]["promoted"]:
        assert second["model_version"] == first["model_version"]
    card = json.loads((tmp_path / "work" / "candidate-day1" / "model_card.json").read_text())
    assert card["comparison"]["reason"] == first["retrain"]["reason"]
    png = plot(report, tmp_path / "sim.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (start / "heads.json").is_file()  # the simulation works on a copy: the artefact in service is untouched
