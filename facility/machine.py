"""What this process may use of the machine it runs on: its cores and its memory, as its CPU
affinity and the limits of its cgroup (or of one above it; cgroups v1 or v2) leave them.

A notebook pod limited to 2 CPUs and 8 GiB on a 64-core node of 256 GiB gets 2 cores and
8 GiB: what the machine has is not what a cluster's defaults, the spawner's profiles or the
sample generator may use.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")

Reader = Callable[[Path], float | None]


def usable_cores(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = OWN_CGROUPS) -> int:
    """The cores this process may use. A quota of 1.5 CPUs counts as 2 cores: two processes
    can use it."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quotas = list(_limits(cgroup_root, own_cgroups, "cpu", _v1_cpu, _v2_cpu))
    if quotas:
        cores = min(cores or 1, math.ceil(min(quotas)))
    return max(cores or 1, 1)


def usable_memory(cgroup_root: Path = CGROUP_ROOT, own_cgroups: Path = OWN_CGROUPS) -> int:
    """The bytes of memory this process may use."""
    limits = _limits(cgroup_root, own_cgroups, "memory", _v1_memory, _v2_memory)
    return int(min([psutil.virtual_memory().total, *limits]))


def _limits(root: Path, own: Path, controller: str, v1: Reader, v2: Reader) -> Iterator[float]:
    """A controller's limit in this process's cgroup and in each above it that has one."""
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
                yield from _each_level(mount, path, v2)
        elif controller in controllers.split(","):  # cgroups v1: mounted by its controllers'
            # names, in either order (cpu,cpuacct or cpuacct,cpu), or by the controller's own
            names = controllers.split(",")
            for mount in {root / controllers, root / ",".join(reversed(names)), root / controller}:
                yield from _each_level(mount, path, v1)


def _each_level(mount: Path, path: str, read: Reader) -> Iterator[float]:
    if not mount.is_dir():
        return
    folder = mount / path.strip("/")
    while True:
        try:
            limit = read(folder)
        except (OSError, ValueError):
            limit = None
        if limit is not None:
            yield limit
        if folder == mount or mount not in folder.parents:
            return
        folder = folder.parent


def _v2_cpu(folder: Path) -> float | None:
    quota, period = (folder / "cpu.max").read_text().split()
    return None if quota == "max" else int(quota) / int(period)


def _v1_cpu(folder: Path) -> float | None:
    quota = int((folder / "cpu.cfs_quota_us").read_text())
    period = int((folder / "cpu.cfs_period_us").read_text())
    return None if quota <= 0 else quota / period


def _v2_memory(folder: Path) -> float | None:
    limit = (folder / "memory.max").read_text().strip()
    return None if limit == "max" else float(limit)


def _v1_memory(folder: Path) -> float | None:
    return float((folder / "memory.limit_in_bytes").read_text())  # no limit: a huge number
