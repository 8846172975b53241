import pytest
from pydantic import ValidationError

from pipeline.config import Settings, load_settings

pytestmark = pytest.mark.unit


def test_env_vars_use_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODPIPE_KAFKA__BOOTSTRAP_SERVERS", "k1:9092,k2:9092")
    monkeypatch.setenv("MODPIPE_KAFKA__TOPIC_PREFIX", "t1.")
    settings = Settings()
    assert settings.kafka.bootstrap_servers == "k1:9092,k2:9092"
    assert settings.kafka.topic(settings.kafka.verdicts_topic) == "t1.moderation.verdicts"


def test_stack_env_file_is_read_under_real_environment(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    (tmp_path / "stack.env").write_text("MODPIPE_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:1111\nMODPIPE_REDIS__URL=redis://x:1/0\n")
    monkeypatch.setenv("MODPIPE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("MODPIPE_REDIS__URL", "redis://explicit:2/0")
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == "127.0.0.1:1111"
    assert settings.redis.url == "redis://explicit:2/0"


def test_secrets_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODPIPE_REDIS__PASSWORD", "hunter2")
    settings = Settings()
    assert settings.redis.password is not None and settings.redis.password.get_secret_value() == "hunter2"
    assert "hunter2" not in str(settings.masked())


def test_settings_are_frozen_and_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = Settings()
    with pytest.raises(ValidationError):
        settings.kafka.partitions = 3  # type: ignore[misc]
    monkeypatch.setenv("MODPIPE_KAFKA__PARTITIONS", "0")
    with pytest.raises(ValidationError):
        Settings()


def test_readme_settings_table_is_the_code_s() -> None:
    """Every setting, its default and its description appear in the README exactly as the code declares them."""
    from pipeline.config import PROJECT_ROOT, settings_table

    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    assert settings_table() in readme, "README settings table is stale: paste `modpipe config show --markdown`"


def test_every_setting_is_described() -> None:
    from pipeline.config import settings_rows

    assert [var for var, _, description in settings_rows() if not description.strip()] == []
