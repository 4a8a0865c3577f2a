"""The server sizes its jobs by the CPUs it may use: affinity and the container's CPU quota."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cpus import usable_cpus


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_no_cgroup_files_is_the_affinity_mask(tmp_path: Path) -> None:
    assert usable_cpus(tmp_path) == affinity()


@pytest.mark.parametrize(("cpu_max", "cpus"), [("50000 100000", 1), ("100000 100000", 1), ("max 100000", None)])
def test_a_cgroup_v2_quota_caps_the_count(tmp_path: Path, cpu_max: str, cpus: int | None) -> None:
    (tmp_path / "cpu.max").write_text(cpu_max + "\n")
    assert usable_cpus(tmp_path) == (affinity() if cpus is None else min(cpus, affinity()))


def test_a_cgroup_v1_quota_caps_the_count(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert usable_cpus(tmp_path) == affinity()


def test_a_quota_above_the_affinity_mask_does_not_raise_it(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text(f"{1000 * 100000} 100000\n")
    assert usable_cpus(tmp_path) == affinity()


def test_an_unreadable_quota_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("garbage")
    assert usable_cpus(tmp_path) == affinity()


def test_the_affinity_mask_counts_not_the_node(tmp_path: Path) -> None:
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert usable_cpus(tmp_path) == 1
    finally:
        os.sched_setaffinity(0, before)
