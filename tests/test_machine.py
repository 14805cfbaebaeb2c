"""The cores and memory a process may use, which the defaults count: its CPU affinity and its
cgroup's limits, not the machine's."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from facility.machine import usable_cores, usable_memory

DEFAULTS = ("from facility.config import ClusterConfig; from facility.hub.spawner import "
            "this_machine; from facility.machine import usable_cores; "
            "print(usable_cores(), ClusterConfig().max_workers, this_machine().cpus, "
            "this_machine().memory)")
GIB = 1 << 30


def test_a_process_pinned_to_one_core_gets_the_defaults_of_one_core() -> None:
    shown = subprocess.run([sys.executable, "-c", DEFAULTS], capture_output=True, text=True,
                           check=True, preexec_fn=lambda: os.sched_setaffinity(0, {0}))
    assert shown.stdout.split()[:3] == ["1", "1", "1"]


@pytest.mark.parametrize(("controller", "limits", "expected"), [
    ("cpu", {"cpu.cfs_period_us": "100000", "cpu.cfs_quota_us": "100000"}, ["1", "1", "1"]),
    ("memory", {"memory.limit_in_bytes": str(GIB)}, [str(GIB)]),
], ids=["one CPU", "1 GiB"])
def test_a_real_cgroups_limit_is_what_the_spawner_and_the_defaults_count(
        controller: str, limits: dict[str, str], expected: list[str]) -> None:
    """A real cgroup (v1, which this machine mounts; the suite runs as root) with a limit, and
    a process moved into it."""
    group = Path("/sys/fs/cgroup") / controller / f"facility-test-{os.getpid()}"
    group.mkdir()
    child = subprocess.Popen([sys.executable, "-c", f"input(); {DEFAULTS}"], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        for name, value in limits.items():
            (group / name).write_text(value)
        (group / "cgroup.procs").write_text(str(child.pid))
        shown, _ = child.communicate("go\n", timeout=60)
    finally:
        child.kill()
        child.wait()
        group.rmdir()
    assert child.returncode == 0
    numbers = shown.split()
    assert (numbers[:3] if controller == "cpu" else numbers[3:]) == expected


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_limits_are_found_in_either_cgroup_version_and_above_the_own_group(
        tmp_path: Path) -> None:
    own = tmp_path / "self-cgroup"
    machine = len(os.sched_getaffinity(0))

    _write(own, "0::/kubepods/pod1/notebook\n")
    _write(tmp_path / "kubepods/pod1/notebook/cpu.max", "max 100000\n")
    assert usable_cores(tmp_path, own) == machine  # no quota on the way up
    _write(tmp_path / "kubepods/pod1/cpu.max", "50000 100000\n")  # the pod's: half a CPU
    assert usable_cores(tmp_path, own) == 1

    v1 = tmp_path / "v1"
    _write(own, "4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n")
    _write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "-1\n")
    _write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_period_us", "100000\n")
    assert usable_cores(v1, own) == machine
    _write(v1 / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us", "90000\n")
    assert usable_cores(v1, own) == 1
    mounted_the_other_way = tmp_path / "v1-other-order" / "cpuacct,cpu"
    shutil.copytree(v1 / "cpu,cpuacct", mounted_the_other_way)
    assert usable_cores(mounted_the_other_way.parent, own) == 1

    _write(own, "0::/user/lab\n")
    total = psutil.virtual_memory().total
    _write(tmp_path / "user/lab/memory.max", "max\n")
    assert usable_memory(tmp_path, own) == total
    _write(tmp_path / "user/memory.max", f"{GIB}\n")
    assert usable_memory(tmp_path, own) == GIB
    _write(own, "5:memory:/docker/abc\n")
    _write(v1 / "memory/docker/abc/memory.limit_in_bytes", "9223372036854771712\n")
    assert usable_memory(v1, own) == total
    _write(v1 / "memory/docker/abc/memory.limit_in_bytes", f"{GIB // 2}\n")
    assert usable_memory(v1, own) == GIB // 2

    _write(own, "not a cgroup line\n")
    assert usable_cores(v1, own) == machine
    assert usable_cores(v1, tmp_path / "no such file") == machine
    assert usable_memory(v1, tmp_path / "no such file") == total
