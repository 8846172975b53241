"""Worker processes by role, started exactly as an operator would (``modpipe worker --role ...``).

One OS process per worker, so a kill -9 in a chaos run is a real crash: nothing flushed, nothing committed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

from pipeline.app import Role, worker_ready_file
from pipeline.config import Settings
from pipeline.errors import StackError


class Workers:
    """Worker processes by role, started with the environment that points them at ``settings``."""

    def __init__(self, settings: Settings, env: dict[str, str], log_dir: Path) -> None:
        self.settings = settings
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.procs: dict[Role, list[subprocess.Popen[bytes]]] = defaultdict(list)  # several per role: one group

    def start(self, role: Role) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_dir / f"worker-{role.value}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--role", role.value],
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        self.procs[role].append(proc)
        return proc

    def start_all(self, roles: list[Role] | None = None, per_role: int = 1) -> None:
        for role in roles or list(Role):
            for _ in range(per_role):
                self.start(role)

    def _all(self) -> list[tuple[Role, subprocess.Popen[bytes]]]:
        return [(role, proc) for role, procs in self.procs.items() for proc in procs]

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until every started worker owns partitions and has its handler built."""
        deadline = time.monotonic() + timeout_s
        pending = self._all()
        while pending:
            for role, proc in list(pending):
                if proc.poll() is not None:
                    raise StackError(
                        f"{role.value} worker exited with code {proc.returncode}; see "
                        f"{self.log_dir / f'worker-{role.value}.log'}"
                    )
                if Path(worker_ready_file(self.settings, role, proc.pid)).exists():
                    pending.remove((role, proc))
            if time.monotonic() > deadline:
                raise StackError(f"workers not ready within {timeout_s:.0f}s: {[r.value for r, _ in pending]}")
            time.sleep(0.2)

    def kill(self, role: Role) -> None:
        """kill -9 the oldest worker of ``role``: a real crash, nothing flushed, nothing committed."""
        proc = self.procs[role].pop(0)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self, grace_s: float = 10.0) -> None:
        everything = [proc for _, proc in self._all()]
        for proc in everything:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in everything:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A Faust worker whose broker vanished can ignore SIGTERM.
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
