"""Session fixtures shared by the integration and end-to-end tests.

The stacks run on free ports in a pytest temp dir with a private Redis, so a test session never touches a
developer's stack or the shared Redis on 6379. A stack that cannot start fails the tests that need it (a skipped
integration test would hide a broken environment).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from pipeline.errors import StackError
from pipeline.stack import StackInfo, stack_down, stack_up

# Triton may import torch for the models in triton_repo; on 2 busy cores that can take a while.
_STACK_TIMEOUT_S = float(os.environ.get("MODPIPE_TEST_STACK_TIMEOUT_S", "180"))


def _start(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs: object) -> StackInfo:
    state_dir = tmp_path_factory.mktemp(name)
    try:
        return stack_up(state_dir, private_redis=True, timeout_s=_STACK_TIMEOUT_S, **kwargs)  # type: ignore[arg-type]
    except StackError as exc:
        pytest.fail(f"{name} did not start: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """Broker, private Redis and Triton serving the project's ``triton_repo``."""
    info = _start(tmp_path_factory, "local_stack")
    yield info
    stack_down(info.state_dir)


@pytest.fixture(scope="session")
def kafka_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackInfo]:
    """Broker and private Redis only (no Triton): starts in well under a second, for tests that need no model."""
    info = _start(tmp_path_factory, "kafka_stack", start_triton=False)
    yield info
    stack_down(info.state_dir)


@pytest.fixture
def unique_prefix() -> str:
    """A short unique string ending in '.', for per-test topic, consumer-group and Redis key prefixes."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def isolated_env(local_stack: StackInfo, unique_prefix: str, monkeypatch: pytest.MonkeyPatch) -> StackInfo:
    """Point this process (and the workers it starts) at the test stack, with private topics and keys."""
    monkeypatch.setenv("MODPIPE_STATE_DIR", str(local_stack.state_dir))
    monkeypatch.setenv("MODPIPE_KAFKA__TOPIC_PREFIX", unique_prefix)
    monkeypatch.setenv("MODPIPE_REDIS__KEY_PREFIX", unique_prefix)
    return local_stack
