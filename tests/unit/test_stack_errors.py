"""The local stack fails fast with one-line messages, and never signals a process it did not start.

No services are started here: every case fails in the preflight (binaries, ports, repository) or uses a
short-lived helper process of our own."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import StackError
from pipeline.stack import (
    ServiceInfo,
    StackInfo,
    _cause_from_log,
    _log_tail,
    _wait_ready,
    free_port,
    service_alive,
    stack_down,
    stack_status,
    stack_up,
)

pytestmark = pytest.mark.unit


def _one_line(exc: pytest.ExceptionInfo[StackError]) -> str:
    message = str(exc.value)
    assert message and "\n" not in message
    return message


def test_missing_broker_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", str(tmp_path / "no-tansu"))
    with pytest.raises(StackError) as err:
        stack_up(tmp_path, private_redis=True, start_triton=False)
    assert "tansu" in _one_line(err)
    assert stack_status(tmp_path) is None


def test_missing_redis_server(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on PATH: no redis-server
    with pytest.raises(StackError) as err:
        stack_up(tmp_path, private_redis=True, start_triton=False)
    assert "redis-server is not installed" in _one_line(err)


def test_missing_model_repository(tmp_path: Path) -> None:
    with pytest.raises(StackError) as err:
        stack_up(tmp_path, triton_repo=tmp_path / "nope", private_redis=True)
    assert "nope does not exist" in _one_line(err)


def test_pinned_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(StackError) as err:
            stack_up(tmp_path, private_redis=True, start_triton=False, ports={"kafka": port})
    assert f"port {port} for kafka is already in use" in _one_line(err)


def test_unknown_port_name(tmp_path: Path) -> None:
    with pytest.raises(StackError) as err:
        stack_up(tmp_path, private_redis=True, start_triton=False, ports={"kafak": 1234})
    assert "kafak" in _one_line(err)


def test_free_port_is_bindable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", free_port()))


def test_log_tail_is_one_line_without_colours_or_old_runs(tmp_path: Path) -> None:
    log = tmp_path / "kafka.log"
    log.write_text(
        "\n=== 2026-01-01 00:00:00 starting kafka: tansu\nold run line\n"
        "\n=== 2026-01-01 00:01:00 starting kafka: tansu\n"
        "\x1b[31mERROR\x1b[0m err=Os { code: 98, kind: AddrInUse, message: \"Address in use\" }\n"
    )
    tail = _log_tail(log)
    assert "\n" not in tail and "\x1b" not in tail and "old run" not in tail
    assert _cause_from_log(log) == "port in use"


def test_cause_names_the_model_that_failed(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    log.write_text(
        "=== now starting triton\nE1127 model_lifecycle.cc:642] \"failed to load 'reasoner' version 1: "
        "Internal: ModuleNotFoundError: No module named 'x'\\n\\nAt:\\n  model.py(1)\"\n"
        "error: creating server: Internal - failed to load all models\n"
    )
    assert _cause_from_log(log) == "model 'reasoner' failed to load: Internal: ModuleNotFoundError: No module named 'x'"


def test_cause_names_a_bad_model_directory(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    log.write_text(
        '=== now starting triton\nE1127 23:42:38.931894 12021 server.cc:241] "CudaDriverHelper has not been initialized."\n'
        "E1127 23:42:38.932258 12021 model_repository_manager.cc:1460] \"Poll failed for model directory 'm': "
        'Invalid model name: no backend."\nerror: creating server: Internal - failed to load all models\n'
    )
    assert _cause_from_log(log) == "Poll failed for model directory 'm': Invalid model name: no backend."


def test_process_that_exits_reports_cause_and_log(tmp_path: Path) -> None:
    log = tmp_path / "redis.log"
    code = "import sys; print('bind: Address already in use', file=sys.stderr); sys.exit(1)"
    with log.open("ab") as fh:
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=fh)
    with pytest.raises(StackError) as err:
        _wait_ready("redis", proc, log, lambda: False, time.monotonic() + 30, 30)
    message = _one_line(err)
    assert message.startswith("redis failed to start: port in use") and str(log) in message


def test_not_ready_in_time(tmp_path: Path) -> None:
    log = tmp_path / "triton.log"
    log.write_text("=== starting\nstill loading\n")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        with pytest.raises(StackError) as err:
            _wait_ready("triton", proc, log, lambda: False, time.monotonic() + 0.2, 0.2)
        assert "not ready within 0 s" in _one_line(err) and "still loading" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_stack_down_without_a_stack(tmp_path: Path) -> None:
    assert stack_down(tmp_path) == []
    (tmp_path / "stack.json").write_text("{not json")
    (tmp_path / "stack.env").write_text("X=1\n")
    assert stack_down(tmp_path) == []
    assert not (tmp_path / "stack.json").exists() and not (tmp_path / "stack.env").exists()


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    # The recorded broker PID now belongs to this pytest process (PID reuse): it must not be killed.
    me = ServiceInfo("kafka", os.getpid(), "127.0.0.1:1", tmp_path / "kafka.log")
    info = StackInfo(tmp_path, "127.0.0.1:1", "redis://127.0.0.1:2/0", "", "", "", {"kafka": me})
    (tmp_path / "stack.json").write_text(info.to_json())
    assert stack_status(tmp_path) == info
    assert service_alive(info) == {"kafka": False}
    assert stack_down(tmp_path) == []


def test_env_names_every_setting(tmp_path: Path) -> None:
    info = StackInfo(tmp_path, "127.0.0.1:1", "redis://127.0.0.1:2/0", "127.0.0.1:3", "127.0.0.1:4", "127.0.0.1:5", {})
    assert info.env() == {
        "MODPIPE_STATE_DIR": str(tmp_path),
        "MODPIPE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "MODPIPE_REDIS__URL": "redis://127.0.0.1:2/0",
        "MODPIPE_TRITON__GRPC_URL": "127.0.0.1:3",
        "MODPIPE_TRITON__HTTP_URL": "127.0.0.1:4",
        "MODPIPE_KAFKA__SESSION_TIMEOUT_S": "2.0",
        "MODPIPE_KAFKA__HEARTBEAT_INTERVAL_S": "0.5",
    }
    assert StackInfo.from_json(info.to_json()) == info


def test_a_stack_recorded_by_an_older_version_reads_and_is_not_restarted(tmp_path: Path) -> None:
    from pipeline.stack import service_restart

    old = {"state_dir": str(tmp_path), "kafka_bootstrap": "127.0.0.1:1", "redis_url": "redis://127.0.0.1:2/0",
           "triton_grpc": "", "triton_http": "", "triton_metrics": "", "triton_repo": None,
           "services": {"kafka": {"name": "kafka", "pid": 1, "address": "127.0.0.1:1", "log_path": None}}}
    (tmp_path / "stack.json").write_text(__import__("json").dumps(old))
    info = stack_status(tmp_path)
    assert info is not None and not info.durable and info.services["kafka"].argv == ()
    with pytest.raises(StackError, match="not the stack's own") as err:
        service_restart(tmp_path, "kafka")
    assert _one_line(err)


def test_restart_without_a_stack_says_so(tmp_path: Path) -> None:
    from pipeline.stack import service_restart

    with pytest.raises(StackError, match="no local stack recorded"):
        service_restart(tmp_path, "redis")
    with pytest.raises(StackError, match="unknown service 'postgres'"):
        service_restart(tmp_path, "postgres")
