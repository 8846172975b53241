"""HTTP service processes the benches start (``modpipe review serve``, ``modpipe gateway serve``): wait until one
answers its health route, and stop it.

Kept in one place so every bench waits and stops the same way: a process that exits while starting fails at once
with its log's path, and one that ignores SIGTERM is killed after a grace period.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from pathlib import Path

import httpx


async def wait_healthy(url: str, proc: subprocess.Popen[bytes], log_path: Path, what: str, *,
                       timeout_s: float = 60.0, request_timeout_s: float = 1.0, interval_s: float = 0.1) -> None:
    """Wait until ``proc`` (``what``, e.g. "the gateway") answers 200 on ``url/healthz``; fail if it exits first
    or does not answer within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited with {proc.returncode} (log: {log_path})")
            try:
                if (await client.get(f"{url}/healthz", timeout=request_timeout_s)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(interval_s)
    raise TimeoutError(f"{what} did not answer on {url} within {timeout_s:.0f}s (log: {log_path})")


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited after ``grace_s``."""
    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
