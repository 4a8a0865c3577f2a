"""How many CPUs this process may really use.

``os.cpu_count()`` counts the node's cores. In a container with a CPU limit (a cgroup quota) or a
restricted CPU set, sizing thread pools by it oversubscribes the share the container gets, and the
kernel throttles every thread. The server sizes its jobs and their onnxruntime threads by this count.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["usable_cpus"]

CGROUP = Path("/sys/fs/cgroup")


def usable_cpus(cgroup: Path = CGROUP) -> int:
    """The CPUs of this process's affinity mask, capped by its cgroup's CPU quota (v2 ``cpu.max`` or
    v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us``), rounded down; at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        count = os.cpu_count() or 1
    quota = _quota(cgroup)
    if quota is not None:
        count = min(count, int(quota))
    return max(1, count)


def _quota(cgroup: Path) -> float | None:
    """CPUs the quota allows (e.g. 1.5), or None without a quota."""
    try:
        limit, period = (cgroup / "cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        limit_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
        return None if limit_us <= 0 else limit_us / period_us
    except (OSError, ValueError):
        return None
