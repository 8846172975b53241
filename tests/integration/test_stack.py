"""The local stack really works: the broker speaks Kafka, Redis answers, Triton serves a model, and stopping
leaves no process behind. Uses its own tiny Triton model so it does not depend on the project's triton_repo."""

from __future__ import annotations

import asyncio
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from pipeline.errors import StackError
from pipeline.stack import StackInfo, service_alive, stack_down, stack_status, stack_up

pytestmark = pytest.mark.integration

_CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [{{ name: "IN", data_type: TYPE_FP32, dims: [ -1 ] }}]
output [{{ name: "OUT", data_type: TYPE_FP32, dims: [ -1 ] }}]
instance_group [{{ kind: KIND_CPU, count: 1 }}]
"""
_DOUBLER = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "IN").as_numpy()
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", (x * 2).astype(np.float32))]))
        return responses
"""


def _model_repo(root: Path, name: str, source: str) -> Path:
    (root / name / "1").mkdir(parents=True)
    (root / name / "config.pbtxt").write_text(_CONFIG.format(name=name))
    (root / name / "1" / "model.py").write_text(source)
    return root


def _gone(pid: int | None) -> bool:
    """No process with this PID, or only a zombie awaiting its parent."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def _live_processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and not _gone(int(proc.name)):
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:  # exited while we looked
                continue
    return found


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _model_repo(tmp_path_factory.mktemp("repo"), "doubler", _DOUBLER)


@pytest.fixture(scope="module")
def tiny_stack(tmp_path_factory: pytest.TempPathFactory, tiny_repo: Path) -> Iterator[StackInfo]:
    state_dir = tmp_path_factory.mktemp("tiny_stack")
    try:
        info = stack_up(state_dir, triton_repo=tiny_repo, private_redis=True, timeout_s=120)
    except StackError as exc:
        pytest.fail(f"stack did not start: {exc}", pytrace=False)
    yield info
    stack_down(state_dir)


def test_stack_is_recorded_and_alive(tiny_stack: StackInfo, monkeypatch: pytest.MonkeyPatch) -> None:
    assert stack_status(tiny_stack.state_dir) == tiny_stack
    assert service_alive(tiny_stack) == {"kafka": True, "redis": True, "triton": True}
    assert all(s.pid and s.log_path and s.log_path.exists() for s in tiny_stack.services.values())
    # Workers find the stack through stack.env, read by config.load_settings under the real environment.
    from pipeline.config import load_settings

    for key in tiny_stack.env():
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MODPIPE_STATE_DIR", str(tiny_stack.state_dir))
    settings = load_settings()
    assert settings.kafka.bootstrap_servers == tiny_stack.kafka_bootstrap
    assert settings.redis.url == tiny_stack.redis_url
    assert settings.triton.grpc_url == tiny_stack.triton_grpc
    assert settings.kafka.session_timeout_s == 2.0


def test_broker_produce_consume_roundtrip(tiny_stack: StackInfo, unique_prefix: str) -> None:
    topic, group = f"{unique_prefix}roundtrip", f"{unique_prefix}group"

    async def roundtrip() -> list[tuple[bytes | None, bytes | None]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=tiny_stack.kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=tiny_stack.kafka_bootstrap)
        await producer.start()
        try:
            for i in range(3):
                await producer.send_and_wait(topic, f"v{i}".encode(), key=b"same-key")
        finally:
            await producer.stop()
        # A consumer group, with the short local timeouts the stack advertises (group joins wait for them).
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=tiny_stack.kafka_bootstrap, group_id=group,
                                    auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=500)
        await consumer.start()
        try:
            got = []
            while len(got) < 3:
                msg = await asyncio.wait_for(consumer.getone(), timeout=30)
                got.append((msg.key, msg.value))
            return got
        finally:
            await consumer.stop()

    assert asyncio.run(roundtrip()) == [(b"same-key", b"v0"), (b"same-key", b"v1"), (b"same-key", b"v2")]


def test_private_redis_answers(tiny_stack: StackInfo, unique_prefix: str) -> None:
    assert tiny_stack.services["redis"].pid is not None
    assert not tiny_stack.redis_url.startswith("redis://127.0.0.1:6379/")
    client = redis.Redis.from_url(tiny_stack.redis_url)
    try:
        assert client.ping()
        client.set(f"{unique_prefix}k", "v")
        assert client.get(f"{unique_prefix}k") == b"v"
    finally:
        client.close()


def test_triton_ready_and_model_answers(tiny_stack: StackInfo) -> None:
    assert grpcclient.InferenceServerClient(url=tiny_stack.triton_grpc).is_server_ready()
    client = httpclient.InferenceServerClient(url=tiny_stack.triton_http)
    assert client.is_model_ready("doubler")
    inp = httpclient.InferInput("IN", [3], "FP32")
    inp.set_data_from_numpy(np.array([1.0, 2.0, 3.5], dtype=np.float32))
    result = client.infer("doubler", [inp])
    assert result.as_numpy("OUT").tolist() == [2.0, 4.0, 7.0]


def test_stack_up_again_returns_the_running_stack(tiny_stack: StackInfo, tiny_repo: Path) -> None:
    started = time.monotonic()
    again = stack_up(tiny_stack.state_dir, triton_repo=tiny_repo, private_redis=True)
    assert again == tiny_stack
    assert time.monotonic() - started < 5


def test_stack_up_with_another_repo_refuses(tiny_stack: StackInfo, tmp_path: Path) -> None:
    with pytest.raises(StackError, match="already running") as err:
        stack_up(tiny_stack.state_dir, triton_repo=tmp_path, private_redis=True)
    assert "\n" not in str(err.value)


def test_reused_redis_is_not_stopped(tiny_stack: StackInfo, tmp_path: Path) -> None:
    info = stack_up(tmp_path, redis_url=tiny_stack.redis_url, start_triton=False)
    assert info.services["redis"].pid is None and info.redis_url == tiny_stack.redis_url
    assert "MODPIPE_TRITON__GRPC_URL" not in info.env()
    assert stack_down(tmp_path) == ["kafka"]
    assert service_alive(tiny_stack)["redis"]


def test_stack_down_stops_every_pid(tiny_repo: Path, tmp_path: Path) -> None:
    info = stack_up(tmp_path, triton_repo=tiny_repo, private_redis=True)
    pids = {name: s.pid for name, s in info.services.items()}
    assert sorted(stack_down(tmp_path)) == ["kafka", "redis", "triton"]
    assert all(_gone(pid) for pid in pids.values()), pids
    # The python-backend stub ran in triton's process group: the whole group must be gone.
    with pytest.raises(ProcessLookupError):
        os.killpg(pids["triton"], 0)  # type: ignore[arg-type]
    assert not (tmp_path / "stack.json").exists() and not (tmp_path / "stack.env").exists()
    assert stack_status(tmp_path) is None
    assert stack_down(tmp_path) == []


def test_model_that_fails_to_load_names_the_model(tmp_path: Path) -> None:
    repo = _model_repo(tmp_path / "repo", "broken", "import no_such_module_for_modpipe_tests\n")
    with pytest.raises(StackError) as err:
        stack_up(tmp_path / "state", triton_repo=repo, private_redis=True)
    message = str(err.value)
    assert "\n" not in message
    assert "'broken' failed to load" in message and "no_such_module_for_modpipe_tests" in message
    assert "triton.log" in message
    assert stack_status(tmp_path / "state") is None
    # Nothing from the failed start is left: the broker and Redis it had started were stopped too.
    kafka_listener = re.search(r"--listener-url (\S+)", (tmp_path / "state" / "logs" / "kafka.log").read_text())
    assert kafka_listener is not None
    assert _live_processes_mentioning(kafka_listener.group(1)) == []
    assert _live_processes_mentioning(str(tmp_path / "state")) == []  # redis --dir, tritonserver's private copy


# -- the durable stack and restarting one service -----------------------------------------------------------------


async def _produce(bootstrap: str, topic: str, producers: int, each: int) -> int:
    """``producers`` producers write ``each`` messages to one partition concurrently; returns how many were acked."""
    clients = [AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all") for _ in range(producers)]
    for client in clients:
        await client.start()

    async def run(i: int, client: AIOKafkaProducer) -> int:
        for j in range(each):
            await client.send_and_wait(topic, f"p{i}-{j}".encode(), partition=0)
        return each

    try:
        return sum(await asyncio.gather(*(run(i, c) for i, c in enumerate(clients))))
    finally:
        for client in clients:
            await client.stop()


async def _values(bootstrap: str, topic: str) -> set[bytes]:
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, 0)
        seen: set[bytes] = set()
        idle = 0
        while idle < 3:
            batch = await consumer.getmany(timeout_ms=1000)
            idle = 0 if batch else idle + 1
            for messages in batch.values():
                seen.update(m.value for m in messages)
        return seen
    finally:
        await consumer.stop()


async def _create(bootstrap: str, topic: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
    finally:
        await admin.close()


@pytest.fixture(scope="module")
def durable_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    state_dir = tmp_path_factory.mktemp("durable_stack")
    try:
        info = stack_up(state_dir, durable=True, start_triton=False, timeout_s=120)
    except StackError as exc:
        pytest.fail(f"durable stack did not start: {exc}", pytrace=False)
    yield info
    stack_down(state_dir)


def test_durable_broker_keeps_every_acknowledged_message_across_kill_9(durable_stack: StackInfo,
                                                                       unique_prefix: str) -> None:
    from pipeline.stack import service_kill, service_start

    topic = f"{unique_prefix}durable"
    assert durable_stack.durable and set(durable_stack.services) == {"s3", "kafka", "redis"}
    asyncio.run(_create(durable_stack.kafka_bootstrap, topic))
    # Three producers on one partition: the broker's conditional writes on S3 must keep them from overwriting
    # each other (an S3 server that ignores If-Match loses about half of these).
    acked = asyncio.run(_produce(durable_stack.kafka_bootstrap, topic, producers=3, each=60))
    service_kill(durable_stack.state_dir, "kafka")
    restarted = service_start(durable_stack.state_dir, "kafka")
    assert restarted.address == durable_stack.services["kafka"].address  # same port
    assert len(asyncio.run(_values(durable_stack.kafka_bootstrap, topic))) == acked == 180


def test_restarting_redis_keeps_its_port_and_its_data(durable_stack: StackInfo, unique_prefix: str) -> None:
    from pipeline.stack import service_restart

    client = redis.Redis.from_url(durable_stack.redis_url)
    client.set(f"{unique_prefix}kept", "yes")
    client.close()
    old_pid = durable_stack.services["redis"].pid
    svc = service_restart(durable_stack.state_dir, "redis", hard=True)
    assert svc.pid != old_pid and svc.address == durable_stack.redis_url
    client = redis.Redis.from_url(durable_stack.redis_url)
    try:
        assert client.get(f"{unique_prefix}kept") == b"yes"  # append-only file, written before the reply
    finally:
        client.close()
    assert service_alive(stack_status(durable_stack.state_dir)) == {"s3": True, "kafka": True, "redis": True}


def test_restart_refuses_a_service_the_stack_does_not_own(tiny_stack: StackInfo, tmp_path: Path) -> None:
    from pipeline.stack import service_restart

    info = stack_up(tmp_path, redis_url=tiny_stack.redis_url, start_triton=False)
    try:
        with pytest.raises(StackError, match="not the stack's own"):
            service_restart(tmp_path, "redis")
        with pytest.raises(StackError, match="unknown service"):
            service_restart(tmp_path, "postgres")
    finally:
        stack_down(tmp_path)
    assert info.services["redis"].pid is None
