import asyncio

import pytest

from pipeline.app import Role, create_app
from pipeline.config import KafkaSettings, Settings

pytestmark = pytest.mark.unit


def test_worker_consumer_uses_the_configured_fetch_wait(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = Settings(state_dir=tmp_path, kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1", fetch_max_wait_ms=123))

    async def build() -> int:
        app = create_app(settings, Role.REVIEW_INTAKE)
        thread = app.consumer._new_consumer_thread()
        consumer = thread._create_worker_consumer(app.transport)  # constructed only: nothing connects
        return consumer._fetch_max_wait_ms

    # Faust's own driver hard-codes 1500 ms, which put a ~0.4 s floor under every verdict.
    assert asyncio.run(build()) == 123
