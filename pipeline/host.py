"""Facts about the machine a process runs on."""

from __future__ import annotations

import os
import platform


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def machine_summary() -> str:
    """``x86_64, 2 cores, Python 3.11.7``: what every benchmark report says it ran on."""
    return f"{platform.machine()}, {cpu_count()} cores, Python {platform.python_version()}"
