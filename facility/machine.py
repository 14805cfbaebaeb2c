"""What this process may use of the machine it runs on."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")


def usable_cores(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = OWN_CGROUPS) -> int:
    """The cores this process may use: the machine's, less what its CPU affinity and the CPU
    quota of its cgroup (or of one above it; cgroups v1 or v2) leave out. A notebook pod
    limited to 2 CPUs on a 64-core node gets 2, not 64: what the machine has is not what a
    cluster's defaults, the spawner's profiles or the sample generator may use. A quota of
    1.5 CPUs counts as 2 cores: two processes can use it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quotas = list(_cpu_quotas(cgroup_root, own_cgroups))
    if quotas:
        cores = min(cores or 1, math.ceil(min(quotas)))
    return max(cores or 1, 1)


def _cpu_quotas(root: Path, own: Path) -> Iterator[float]:
    """The CPU quota (in CPUs) of this process's cgroup and of each above it that has one."""
    try:
        lines = own.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:  # the kernel writes no such line: nothing to learn from it
            continue
        hierarchy, controllers, path = fields
        if hierarchy == "0" and not controllers:  # cgroups v2
            for mount in (root, root / "unified"):
                yield from _each_level(mount, path, _v2_quota)
        elif "cpu" in controllers.split(","):  # cgroups v1, mounted under a name of its own
            for mount in {root / controllers, root / "cpu", root / "cpu,cpuacct",
                          root / "cpuacct,cpu"}:
                yield from _each_level(mount, path, _v1_quota)


def _each_level(mount: Path, path: str, quota_of: Callable[[Path], float | None]
                ) -> Iterator[float]:
    folder = mount / path.strip("/")
    if not mount.is_dir():
        return
    while True:
        try:
            quota = quota_of(folder)
        except (OSError, ValueError):
            quota = None
        if quota is not None:
            yield quota
        if folder == mount or mount not in folder.parents:
            return
        folder = folder.parent


def _v2_quota(folder: Path) -> float | None:
    quota, period = (folder / "cpu.max").read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _v1_quota(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    period = int((folder / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period
