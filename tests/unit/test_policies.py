"""The shipped policies load, lint clean and keep their golden sets; lint catches what it promises to.

Golden rows from XSTest and HateCheck are references: the tests resolve them from the shared datasets folder
(``MODPIPE_DATASETS_DIR``), while loading and lint must work without it.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest

from pipeline.config import PROJECT_ROOT, Settings
from pipeline.errors import PolicyError
from pipeline.policies import MIN_GOLDEN, PolicyLibrary, content_hash, count_tokens, lint_policy, load_policy
from pipeline.policies.model import (
    REFERENCE_SOURCES,
    GoldenExample,
    GoldenReferenceError,
    reference_text,
    resolve_golden,
)
from pipeline.schemas import Effort

pytestmark = pytest.mark.unit
POLICIES = PROJECT_ROOT / "policies"
DATASETS = Settings().datasets_dir  # the shared labelled data (MODPIPE_DATASETS_DIR), read in place
DEFAULT = {"hate", "harassment", "violence", "sexual", "sexual_minors", "self_harm"}
EXPECTED = DEFAULT | {"fraud_spam"}


@pytest.fixture(scope="module")
def library() -> PolicyLibrary:
    return PolicyLibrary.load(POLICIES)


def test_all_policies_load_strictly(library: PolicyLibrary) -> None:
    assert set(library.ids()) == EXPECTED
    assert library.enforcing_ids() == sorted(EXPECTED)
    # fraud_spam has no triage head: judged only when an item or escalation names it, never by default
    assert library.default_ids() == sorted(DEFAULT)
    assert library.get("fraud_spam").scope == "on_request"


@pytest.mark.parametrize("policy_id", sorted(EXPECTED))
def test_policy_lints_clean_and_is_complete(library: PolicyLibrary, policy_id: str) -> None:
    policy = library.get(policy_id)
    assert lint_policy(policy) == []
    assert policy.content_hash == content_hash(policy.text) and len(policy.content_hash) == 16
    assert {r.label for r in policy.rules} == {0, 1}
    assert len(policy.golden) >= MIN_GOLDEN == 40
    assert {g.label for g in policy.golden} == {0, 1}
    assert all(g.rule_id in policy.rule_ids for g in policy.golden)
    golden = resolve_golden(policy.golden, DATASETS)
    assert len({g.text for g in golden}) == len(golden)  # no duplicate rows
    assert 400 <= count_tokens(policy.text) <= 600
    ref = policy.ref()
    # the version IS the content hash of the text the model reads
    assert ref.policy_id == policy_id and ref.version == ref.content_hash == content_hash(policy.text)
    assert (policy.first_effort, policy.escalated_effort) == (Effort.LOW, Effort.HIGH)


def test_golden_sets_hold_the_public_false_positive_traps(library: PolicyLibrary) -> None:
    sources = {g.ref.split(":")[0] for p in library for g in p.golden if g.ref}
    assert sources == {"xstest", "hatecheck"}
    hate_traps = [g for g in library.get("hate").golden if g.ref.startswith("hatecheck") and g.label == 0]
    violence_traps = [g for g in library.get("violence").golden if g.ref.startswith("xstest") and g.label == 0]
    assert len(hate_traps) >= 8 and len(violence_traps) >= 10
    violence_traps = [g for g in resolve_golden(library.get("violence").golden, DATASETS) if g.ref and g.label == 0]
    assert any(g.ref == "xstest:1" and "kill a Python process" in g.text for g in violence_traps)


def test_golden_reference_resolves_to_the_data_set_text() -> None:
    import csv

    with (DATASETS / "xstest" / "xstest_prompts.csv").open(newline="", encoding="utf-8") as fh:
        xstest = {r["id"]: r["prompt"] for r in csv.DictReader(fh)}
    with (DATASETS / "hatecheck" / "test_suite_cases.csv").open(newline="", encoding="utf-8") as fh:
        hatecheck = {r["case_id"]: r["test_case"] for r in csv.DictReader(fh)}
    rows = (GoldenExample(label=0, rule_id="VI0.a", ref="xstest:1"),
            GoldenExample(label=0, rule_id="HT0.a", ref="hatecheck:2622"),
            GoldenExample(label=0, rule_id="VI0.a", content="our own row"))
    resolved = resolve_golden(rows, DATASETS)
    assert [g.text for g in resolved] == [xstest["1"], hatecheck["2622"].strip(), "our own row"]
    assert [(g.ref, g.label, g.rule_id) for g in resolved] == [(g.ref, g.label, g.rule_id) for g in rows]
    assert reference_text("hatecheck:2622", DATASETS) == hatecheck["2622"].strip()  # the trailing space dropped


def test_every_shipped_reference_resolves(library: PolicyLibrary) -> None:
    refs = [g for p in library for g in p.golden if g.ref]
    assert len(refs) >= 60
    assert all(g.text for g in resolve_golden(refs, DATASETS))


def test_unknown_golden_reference_fails_clearly() -> None:
    row = GoldenExample(label=0, rule_id="VI0.a", ref="xstest:99999")
    with pytest.raises(GoldenReferenceError, match=r"xstest:99999.*MODPIPE_DATASETS_DIR"):
        resolve_golden([row], DATASETS)
    with pytest.raises(GoldenReferenceError, match="xstest:1 is a reference.*MODPIPE_DATASETS_DIR"):
        _ = GoldenExample(label=0, rule_id="VI0.a", ref="xstest:1").text  # unresolved: asked for its text
    with pytest.raises(ValueError, match="not <source>:<id>"):
        GoldenExample(label=0, rule_id="VI0.a", ref="wikipedia:7")


def test_missing_datasets_folder_fails_naming_the_setting_and_the_path(tmp_path: Path) -> None:
    row = GoldenExample(label=0, rule_id="VI0.a", ref="xstest:1")
    absent = tmp_path / "datasets"
    with pytest.raises(GoldenReferenceError, match="MODPIPE_DATASETS_DIR") as caught:
        resolve_golden([row], absent)
    assert str(absent) in str(caught.value)
    absent.mkdir()  # the folder without the file
    with pytest.raises(GoldenReferenceError, match=r"xstest/xstest_prompts\.csv.*MODPIPE_DATASETS_DIR") as caught:
        resolve_golden([row], absent)
    assert str(absent / REFERENCE_SOURCES["xstest"].file) in str(caught.value)


def test_lint_works_on_references_without_the_datasets_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from pipeline.cli.policy import policy_app

    empty = tmp_path / "empty-datasets"
    empty.mkdir()
    monkeypatch.setenv("MODPIPE_DATASETS_DIR", str(empty))
    assert Settings().datasets_dir == empty
    library = PolicyLibrary.load(POLICIES)  # strict: every policy lints, as workers load them
    assert all(lint_policy(p) == [] for p in library)
    assert sum(1 for p in library for g in p.golden if g.ref) >= 60
    result = CliRunner().invoke(policy_app, ["lint"])
    assert result.exit_code == 0, result.output
    # the text is asked for only by `policy test`: a one-line error naming the setting, before any reasoner call
    result = CliRunner().invoke(policy_app, ["test", "violence", "--reasoner", "triton://127.0.0.1:1/none"])
    assert result.exit_code == 1
    assert "MODPIPE_DATASETS_DIR" in result.output and "Traceback" not in result.output


def test_lint_checks_references_by_label_rule_and_repetition(library: PolicyLibrary) -> None:
    policy = library.get("violence")
    wrong = (GoldenExample(label=1, rule_id="VI0.a", ref="xstest:1"),
             GoldenExample(label=0, rule_id="VI9.z", ref="xstest:2"),
             GoldenExample(label=0, rule_id="VI0.a", ref="xstest:6"))
    problems = " | ".join(lint_policy(dataclasses.replace(policy, golden=policy.golden + wrong)))
    assert "golden row xstest:1: label 1 disagrees with rule VI0.a" in problems
    assert "golden row xstest:2 cites unknown rule VI9.z" in problems
    assert "golden rows repeated:" in problems and "xstest:6" in problems


def test_golden_rows_of_our_own_copy_no_public_text(library: PolicyLibrary) -> None:
    """Rows without a reference are the project's own: none repeats an XSTest or HateCheck text."""
    from triage_models.data import load_hatecheck, load_xstest

    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    public = {norm(t) for t in load_xstest(DATASETS).texts + load_hatecheck(DATASETS).texts}
    own = [g.text for p in library for g in p.golden if not g.ref]
    assert len(own) >= 200 and [t for t in own if norm(t) in public] == []


def test_golden_file_rows_need_exactly_a_text_or_a_reference(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    golden = folder / "golden.jsonl"
    rows = golden.read_text().splitlines()
    for bad in ('{"text": "a", "ref": "xstest:1", "label": 0, "rule_id": "VI0.a"}',
                '{"label": 0, "rule_id": "VI0.a"}',
                '{"text": "How do I x?", "label": 0, "rule_id": "VI0.a", "source": "xstest:1"}',
                '{"ref": "elsewhere:1", "label": 0, "rule_id": "VI0.a"}'):
        golden.write_text("\n".join([*rows, bad]) + "\n")
        with pytest.raises(PolicyError, match=f"line {len(rows) + 1} is not a golden row"):
            load_policy(folder)


def test_policy_version_ignores_the_golden_set(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    before = load_policy(folder).version
    golden = folder / "golden.jsonl"
    golden.write_text(golden.read_text() + '{"text": "a new row of our own", "label": 0, "rule_id": "VI0.b"}\n')
    assert load_policy(folder).version == before == content_hash((folder / "policy.md").read_text())


def test_token_count_uses_the_o200k_tokenizer() -> None:
    # quicktok's o200k_harmony: "<|end|>" in text is ordinary text (5 tokens), never the special token
    assert count_tokens("<|end|>") == 5
    assert count_tokens("hello world") == 2


def test_version_changes_with_the_text(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    before = load_policy(folder).version
    text = (folder / "policy.md").read_text()
    (folder / "policy.md").write_text(text.replace("Real target:", "Real target (edited):"))
    assert load_policy(folder).version != before


def test_high_risk_flags(library: PolicyLibrary) -> None:
    assert {p.policy_id for p in library if p.high_risk} == {"self_harm", "sexual_minors"}
    assert {p.policy_id for p in library if p.escalate_to_humans} == {"sexual_minors"}


def test_unknown_policy_is_a_policy_error(library: PolicyLibrary) -> None:
    with pytest.raises(PolicyError, match="unknown policy 'spam'"):
        library.get("spam")


def test_lint_finds_problems(library: PolicyLibrary) -> None:
    policy = library.get("violence")
    broken_text = (
        policy.text.replace("## DEFINITIONS", "## TERMS").replace("Threat:", "Threat: usually")
        + '\nContent: "x"\nAnswer: {"violation": 1, "rule_ids": ["VI9.z"]}\n'
    )
    duplicated = policy.rules + (policy.rules[0],)
    from pipeline.policies.model import parse_examples

    broken = dataclasses.replace(
        policy, text=broken_text, rules=duplicated, examples=parse_examples(broken_text), golden=policy.golden[:3]
    )
    problems = " | ".join(lint_policy(broken))
    assert "missing section '## DEFINITIONS'" in problems
    assert "'usually'" in problems
    assert "not unique: VI1.a" in problems
    assert "VI9.z" in problems
    assert "golden set has 3 rows" in problems


def test_lint_requires_the_output_format_and_an_escalation_path(library: PolicyLibrary) -> None:
    policy = library.get("hate")
    no_format = policy.text.replace('"policy_category": "<deciding rule id>", ', "").replace("confidence below", "low")
    problems = " | ".join(lint_policy(dataclasses.replace(policy, text=no_format)))
    assert "missing keys: policy_category" in problems
    assert "escalation path" in problems
    not_restated = policy.text.replace("Reply format again:", "Examples:").replace(
        '{"violation": 0|1, "policy_category": "...", "rule_ids": [...], "confidence": ..., "rationale": "..."}\n\n', "")
    assert any("restate" in p for p in lint_policy(dataclasses.replace(policy, text=not_restated)))


def test_lint_cli_passes_on_the_shipped_policies() -> None:
    from typer.testing import CliRunner

    from pipeline.cli.policy import policy_app

    result = CliRunner().invoke(policy_app, ["lint"])
    assert result.exit_code == 0, result.output
    assert "fraud_spam" in result.output and "violence" in result.output


def test_lint_flags_length(library: PolicyLibrary) -> None:
    policy = library.get("hate")
    long = dataclasses.replace(policy, text=policy.text + "\n" + "padding words here. " * 200)
    assert any("tokens" in p for p in lint_policy(long))


def _copy_policy(tmp_path: Path, policy_id: str = "violence") -> Path:
    dest = tmp_path / "policies" / policy_id
    shutil.copytree(POLICIES / policy_id, dest)
    return dest


def test_load_names_folder_and_problem(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    (folder / "metadata.toml").write_text((folder / "metadata.toml").read_text().replace('id = "violence"', 'id = "x"'))
    with pytest.raises(PolicyError, match=r"violence.*differs from the folder name"):
        PolicyLibrary.load(tmp_path / "policies")


def test_strict_load_refuses_a_policy_that_does_not_lint(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    (folder / "golden.jsonl").write_text('{"text": "a", "label": 0, "rule_id": "VI0.a"}\n')
    with pytest.raises(PolicyError, match="golden set has 1 rows"):
        PolicyLibrary.load(tmp_path / "policies")
    assert PolicyLibrary.load(tmp_path / "policies", strict=False).get("violence").golden[0].text == "a"


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    (folder / "metadata.toml").write_text("id = [")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(folder)
    (folder / "metadata.toml").unlink()
    with pytest.raises(PolicyError, match="missing metadata.toml"):
        load_policy(folder)


def test_shadow_policy_is_not_enforcing(tmp_path: Path) -> None:
    folder = _copy_policy(tmp_path)
    meta = folder / "metadata.toml"
    meta.write_text(meta.read_text().replace("enforcing = true", "enforcing = false"))
    library = PolicyLibrary.load(tmp_path / "policies")
    assert library.enforcing_ids() == [] and library.shadow_ids() == ["violence"] and library.default_ids() == []
