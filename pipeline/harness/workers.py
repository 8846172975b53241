"""Worker processes by role, started exactly as an operator would (``modpipe worker --role ...``), and supervised.

One OS process per worker, so a kill -9 in a chaos run is a real crash: nothing flushed, nothing committed. The
supervisor (a thread) restarts any worker that exits, whatever the reason (a crash, a kill, a worker that gave up
after ``worker.stall_exit_s`` and exited non-zero for exactly this), with a growing delay between restarts of the
same role, and counts the restarts: what systemd's ``Restart=always`` or a Kubernetes Deployment does in
production.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

from pipeline.app import Role, worker_ready_file
from pipeline.config import Settings
from pipeline.errors import StackError

logger = logging.getLogger(__name__)

RESTART_DELAY_S = (0.5, 1.0, 2.0, 5.0)  # after the 1st, 2nd, 3rd, later exit of a role within a minute


class Workers:
    """Worker processes by role, started with the environment that points them at ``settings``."""

    def __init__(self, settings: Settings, env: dict[str, str], log_dir: Path, supervise: bool = True) -> None:
        self.settings = settings
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.procs: dict[Role, list[subprocess.Popen[bytes]]] = defaultdict(list)  # several per role: one group
        self.restarts: dict[str, int] = defaultdict(int)
        self.wanted: dict[Role, int] = defaultdict(int)  # workers asked for per role (restarts replace, not add)
        self.exit_codes: list[tuple[str, int]] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._recent_exits: dict[Role, list[float]] = defaultdict(list)
        self._supervisor: threading.Thread | None = None
        if supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)
            self._supervisor.start()

    def start(self, role: Role, *, replacing: bool = False) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if not replacing:
            self.wanted[role] += 1
        log_file = open(self.log_dir / f"worker-{role.value}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "worker", "--role", role.value],
            env=self.env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log_file.close()
        with self._lock:
            self.procs[role].append(proc)
        return proc

    def start_all(self, roles: list[Role] | None = None, per_role: int = 1) -> None:
        for role in roles or list(Role):
            for _ in range(per_role):
                self.start(role)

    def _all(self) -> list[tuple[Role, subprocess.Popen[bytes]]]:
        with self._lock:
            return [(role, proc) for role, procs in self.procs.items() for proc in procs]

    def _supervise(self) -> None:
        while not self._stopping.wait(0.25):
            for role, proc in self._all():
                if proc.poll() is None or self._stopping.is_set():
                    continue
                with self._lock:
                    if proc not in self.procs[role]:
                        continue
                    self.procs[role].remove(proc)
                now = time.monotonic()
                recent = [t for t in self._recent_exits[role] if now - t < 60] + [now]
                self._recent_exits[role] = recent
                delay = RESTART_DELAY_S[min(len(recent), len(RESTART_DELAY_S)) - 1]
                self.exit_codes.append((role.value, proc.returncode))
                logger.warning("%s worker (pid %d) exited with code %s: restarting it in %.1f s", role.value,
                               proc.pid, proc.returncode, delay)
                if self._stopping.wait(delay):
                    return
                self.restarts[role.value] += 1
                self.start(role, replacing=True)

    def alive(self, role: Role) -> int:
        return sum(1 for r, proc in self._all() if r is role and proc.poll() is None)

    def wait_ready(self, timeout_s: float = 180.0, roles: list[Role] | None = None) -> None:
        """Block until as many workers of each role (of ``roles``) as were started own partitions and have their
        handler built. A role whose workers exit with the configuration code twice (a handler that can never be
        built) fails at once."""
        from pipeline.app import EXIT_CONFIG

        deadline = time.monotonic() + timeout_s
        while True:
            missing = []
            for role, wanted in self.wanted.items():
                if roles is not None and role not in roles:
                    continue
                ready = sum(1 for r, proc in self._all() if r is role and proc.poll() is None
                            and Path(worker_ready_file(self.settings, role, proc.pid)).exists())
                if ready < wanted:
                    missing.append(role)
                config_exits = sum(1 for r, code in self.exit_codes if r == role.value and code == EXIT_CONFIG)
                dead = [proc for r, proc in self._all() if r is role and proc.poll() is not None]
                if config_exits >= 2 or (self._supervisor is None and dead):
                    code = EXIT_CONFIG if config_exits else dead[0].returncode
                    raise StackError(f"{role.value} worker exited with code {code}; see "
                                     f"{self.log_dir / f'worker-{role.value}.log'}")
            if not missing:
                return
            if time.monotonic() > deadline:
                raise StackError(f"workers not ready within {timeout_s:.0f}s: {[r.value for r in missing]}")
            time.sleep(0.2)

    def kill(self, role: Role) -> int:
        """kill -9 the oldest worker of ``role``: a real crash, nothing flushed, nothing committed.

        With supervision on, the supervisor restarts it (that is part of what a drill checks). Returns its PID.
        """
        with self._lock:
            proc = self.procs[role][0]
        _killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if self._supervisor is None:
            with self._lock:
                self.procs[role].remove(proc)
        return proc.pid

    def stop_all(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=5)
        everything = [proc for _, proc in self._all()]
        for proc in everything:
            if proc.poll() is None:
                _killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in everything:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                # A Faust worker whose broker vanished can ignore SIGTERM.
                _killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        with self._lock:
            self.procs.clear()


def _killpg(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
