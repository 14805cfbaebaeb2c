"""Clusters from a notebook: connect, resize, limits, lifetime, isolation, versions, Kubernetes shape."""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import psutil
import pytest
from distributed import Client

from facility.cluster.base import ClusterError, ClusterInfo, backend_name
from facility.cluster.connect import FacilityCluster, connect
from facility.cluster.limits import Identity, LimitError, WorkerRequest, clamp, limits_for
from facility.cluster.local import local_gpus
from facility.cluster.versions import VersionMismatch, check_versions
from facility.config import FacilityConfig, Limits
from tests import allocator_probe

pytestmark = pytest.mark.integration
PEER = "facility-peer"


def _handle(client: Client) -> FacilityCluster:
    assert isinstance(client.cluster, FacilityCluster)
    return client.cluster


@pytest.fixture
def cluster(facility_config: FacilityConfig) -> Iterator[Client]:
    client = connect("t", min_workers=1, max_workers=1, config=facility_config)
    yield client
    _handle(client).close()


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(predicate) and predicate():
            return
        time.sleep(0.25)
    raise AssertionError(f"not within {timeout} s: {what}")


def _workers(client: Client) -> int:
    return len(client.scheduler_info(n_workers=-1)["workers"])


def test_connect_runs_work_and_adapts_up_and_down(cluster: Client) -> None:
    handle = _handle(cluster)
    assert handle.scheduler_address.startswith("tls://")
    assert cluster.submit(sum, [1, 2, 3]).result() == 6
    assert handle.adapt(1, 3) == {"minimum": 1, "maximum": 3}
    futures = cluster.map(time.sleep, [0.5] * 40, pure=False)
    _wait(lambda: _workers(cluster) == 3, 60, "adaptive scale-up to 3 workers")
    cluster.gather(futures)
    del futures
    _wait(lambda: _workers(cluster) == 1, 60, "adaptive scale-down to 1 worker")
    assert handle.scale(2) == {"workers": 2}
    _wait(lambda: _workers(cluster) == 2, 60, "fixed scale to 2 workers")


def test_workers_keep_freed_memory_for_the_next_chunk(cluster: Client,
                                                      facility_config: FacilityConfig) -> None:
    cloudpickle.register_pickle_by_value(allocator_probe)
    try:
        faults, trim, mmap = cluster.submit(allocator_probe.allocator_report, pure=False).result()
    finally:
        cloudpickle.unregister_pickle_by_value(allocator_probe)
    assert (trim, mmap) == (str(facility_config.cluster.malloc_trim_threshold),
                            str(facility_config.cluster.malloc_mmap_threshold))
    assert allocator_probe.kept_freed_memory(faults), \
        f"{faults} page faults: freed memory went back to the OS after every round"


def test_dashboard_link_from_terminal_and_behind_the_hub(cluster: Client) -> None:
    handle = _handle(cluster)
    link = handle.dashboard_link
    assert link is not None
    assert link.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(link, timeout=10) as response:
        assert response.status == 200
    info = handle.info
    behind_hub = info.dashboard_link({"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"})
    assert behind_hub == f"/user/alice/proxy/{info.dashboard_port}/status"
    remote = ClusterInfo("x", "kubernetes", "tls://s:8786", "alice-x-scheduler.ns", 8787, "alice")
    assert remote.dashboard_link({"JUPYTERHUB_SERVICE_PREFIX": "/user/alice/"}) == \
        "/user/alice/proxy/alice-x-scheduler.ns:8787/status"


def test_request_above_a_group_limit_is_clamped_naming_it(
        facility_config: FacilityConfig, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    config = facility_config.model_copy(deep=True)
    config.cluster.limits.groups = {"cms": Limits(cores=2, workers=10)}
    monkeypatch.setenv("FACILITY_GROUPS", "cms,atlas")
    client = connect("clamped", min_workers=1, max_workers=5, config=config)
    try:
        handle = _handle(client)
        assert "max workers 5 -> 2: VO group 'cms' allows cores=2" in capsys.readouterr().err
        assert "limit: max workers 5 -> 2" in handle.explain()
        handle.adapt(1, 8)
        assert "max workers 8 -> 2" in capsys.readouterr().err
    finally:
        _handle(client).close()


def test_limits_prefer_the_user_then_the_most_generous_group(
        facility_config: FacilityConfig) -> None:
    config = facility_config.model_copy(deep=True)
    config.cluster.limits.groups = {"small": Limits(cores=2), "big": Limits(cores=64)}
    config.cluster.limits.users = {"bob": Limits(workers=1)}
    assert limits_for(config, Identity("alice", ("small", "big"))) == (Limits(cores=64), "VO group 'big'")
    assert limits_for(config, Identity("bob", ("big",)))[1] == "user 'bob'"
    assert limits_for(config, Identity("carol"))[1] == "the default limits"
    request = WorkerRequest(1, 4, threads=2, memory=8 * 2**30, gpus=2)
    granted = clamp(request, Limits(memory="20GiB", gpus=1), "VO group 'x'")
    assert (granted.max_workers, granted.gpus) == (1, 1)
    assert granted.notes == (
        "gpus per worker 2 -> 1: VO group 'x' allows 1 GPUs",
        "max workers 4 -> 2: VO group 'x' allows memory=20GiB (8.00 GiB per worker)",
        "max workers 2 -> 1: VO group 'x' allows gpus=1 (1 GPUs per worker)")
    with pytest.raises(LimitError, match="VO group 'x' leaves no room"):
        clamp(request, Limits(memory="4GiB"), "VO group 'x'")


def test_gpu_workers_are_refused_without_a_gpu(facility_config: FacilityConfig) -> None:
    with pytest.raises(ClusterError, match=rf"GPU\(s\) per worker asked for, but this machine has "
                                           rf"{local_gpus()}"):
        connect("gpu", gpus=local_gpus() + 1, config=facility_config)


def test_idle_cluster_stops_by_itself(facility_config: FacilityConfig) -> None:
    """The idle timeout is shorter than the cluster takes to start its worker: the start is
    not idle time, the time after the client leaves is."""
    client = connect("idle", workers=1, idle_timeout=3, config=facility_config)
    handle = _handle(client)
    assert client.submit(sum, [1, 1]).result() == 2
    client.close()
    assert handle.backend.running() is not None
    _wait(lambda: handle.backend.running() is None, 60, "idle cluster to stop")
    assert not (handle.backend.folder / "record.json").exists()


def test_a_client_waiting_for_workers_keeps_the_cluster_awake_until_it_leaves() -> None:
    """A real scheduler with the facility's preload, a one-second idle timeout and no worker:
    it stays up while a client waits on it however long, and stops once the client is gone."""
    import asyncio

    from distributed import Scheduler

    async def scheduler_life() -> tuple[str, float]:
        async with Scheduler(host="127.0.0.1", port=0, dashboard_address=":0", idle_timeout=1,
                             preload=["facility.cluster.idle"]) as scheduler:
            async with Client(scheduler.address, asynchronous=True):
                await asyncio.sleep(4)
                while_waited = scheduler.status.name
            left = time.monotonic()
            while scheduler.status.name == "running" and time.monotonic() - left < 30:
                await asyncio.sleep(0.1)
            return while_waited, time.monotonic() - left

    while_waited, closed_after = asyncio.run(scheduler_life())
    assert while_waited == "running"
    assert closed_after < 30, "the scheduler stayed up after its last client left"


def _script_env(config: FacilityConfig, **extra: str) -> dict[str, str]:
    return {**os.environ, "FACILITY_CONFIG": str(config.home / "facility.yaml"), **extra}


OWNER_SCRIPT = """
import json, os, sys, time
import facility
client = facility.connect("owned", workers=2)
pids = list(client.run(os.getpid).values()) + list(client.run(os.getppid).values())
record = client.cluster.backend.folder / "record.json"
print(json.dumps({"pids": pids, "folder": str(client.cluster.backend.folder)}), flush=True)
time.sleep(600)
"""


def test_cluster_dies_with_its_killed_owner(facility_config: FacilityConfig) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE,
                             text=True, env=_script_env(facility_config))
    assert owner.stdout is not None
    line = owner.stdout.readline()
    assert line, "the owner process did not report its cluster"
    report = json.loads(line)
    service = json.loads((Path(report["folder"]) / "spec.json").read_text())
    supervisor_record = facility_config.state_path / "run" / f"dask-{service['name']}.json"
    cluster_pid = json.loads(supervisor_record.read_text())["pid"]
    cluster_process = psutil.Process(cluster_pid)
    processes = [cluster_process, *cluster_process.children(recursive=True)]
    assert set(report["pids"]) <= {p.pid for p in processes}  # nannies run in the cluster process
    assert len({p.pid for p in processes} - {cluster_pid}) >= 2
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    _gone, alive = psutil.wait_procs(processes, timeout=60)
    assert alive == []
    assert not (Path(report["folder"]) / "record.json").exists()


def peer_account() -> pwd.struct_passwd:
    """A second local account of the machine (made once), for what other accounts may not do."""
    try:
        return pwd.getpwnam(PEER)
    except KeyError:
        # a parallel test worker may make it first: then useradd fails and the account is there
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        PEER], check=False)
        return pwd.getpwnam(PEER)


PEER_SCRIPT = """
import json, socket, ssl, sys
host, port, key = sys.argv[1], int(sys.argv[2]), sys.argv[3]
result = {}
try:
    open(key).read()
    result["read_key"] = "read"
except PermissionError:
    result["read_key"] = "denied"

def attempt(wrap):
    try:
        with socket.create_connection((host, port), timeout=10) as raw, wrap(raw) as conn:
            conn.sendall(b"\\x00" * 64)
            return "answered" if conn.recv(1024) else "refused: closed"
    except (OSError, ssl.SSLError) as exc:
        return "refused: " + type(exc).__name__

context = ssl.create_default_context()
context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
result["plain"] = attempt(lambda raw: raw)
result["tls_without_cluster_cert"] = attempt(context.wrap_socket)
print(json.dumps(result))
"""

# The system interpreter: the other account cannot run (or read) the project's own one.
SYSTEM_PYTHON = "/usr/bin/python3"


def test_another_users_process_is_refused(cluster: Client) -> None:
    peer = peer_account()
    handle = _handle(cluster)
    host, port = handle.scheduler_address.removeprefix("tls://").rsplit(":", 1)

    def become_peer() -> None:
        os.setgid(peer.pw_gid)
        os.setuid(peer.pw_uid)

    done = subprocess.run([SYSTEM_PYTHON, "-c", PEER_SCRIPT, host, port,
                           str(handle.backend.folder / "key.pem")],
                          capture_output=True, text=True, timeout=120, preexec_fn=become_peer,
                          env={"HOME": "/tmp", "PATH": "/usr/bin:/bin"}, cwd="/tmp")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"read_key": "denied", "plain": result["plain"],
                      "tls_without_cluster_cert": result["tls_without_cluster_cert"]}
    assert result["plain"].startswith("refused")
    assert result["tls_without_cluster_cert"].startswith("refused")
    assert cluster.submit(sum, [1, 2]).result() == 3  # the owner still works


def test_a_dask_client_without_the_clusters_credentials_is_refused(cluster: Client) -> None:
    from distributed.security import Security

    address = _handle(cluster).scheduler_address
    for target, security in ((address, Security.temporary()),
                             (address.replace("tls://", "tcp://"), None)):
        with pytest.raises((OSError, TimeoutError)):
            Client(target, security=security, timeout=5, set_as_default=False)


ATTACH_SCRIPT = """
import sys
import facility
from facility.cluster.versions import VersionMismatch, check_versions
try:
    facility.connect("t")
except VersionMismatch as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""


def test_attaching_with_other_versions_lists_the_mismatches(
        cluster: Client, facility_config: FacilityConfig, tmp_path: Path) -> None:
    fake = tmp_path / "site" / "hist-0.0.1.dist-info"
    fake.mkdir(parents=True)
    (fake / "METADATA").write_text("Metadata-Version: 2.1\nName: hist\nVersion: 0.0.1\n")
    done = subprocess.run([sys.executable, "-c", ATTACH_SCRIPT], capture_output=True, text=True,
                          timeout=120, env=_script_env(facility_config,
                                                       PYTHONPATH=str(tmp_path / "site")))
    assert done.returncode == 3, done.stderr
    from importlib.metadata import version

    assert f"hist: client 0.0.1, scheduler {version('hist')}, worker tls://" in done.stderr
    assert "coffea" not in done.stderr
    with pytest.raises(VersionMismatch, match=r"hist: client 2\.9, scheduler 2\.9, worker tls://w 2\.8"):
        check_versions(_FakeVersions(), "x")


class _FakeVersions:
    """A client whose worker reports an older hist (the real path is the subprocess above)."""

    def get_versions(self, check: bool, packages: list[str]) -> dict:
        return {"client": {"packages": {"hist": "2.9"}}, "scheduler": {"packages": {"hist": "2.9"}},
                "workers": {"tls://w": {"packages": {"hist": "2.8"}}}}


def test_backend_auto_selection(facility_config: FacilityConfig) -> None:
    config = facility_config.model_copy(deep=True)
    config.cluster.backend = "auto"
    pod = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}
    assert backend_name(config, {}) == "local"
    assert backend_name(config, pod) == "local"  # no operator configured
    config.cluster.kubernetes.operator = True
    assert backend_name(config, pod) == "kubernetes"
    assert backend_name(config, {}) == "local"
    config.cluster.backend = "local"
    assert backend_name(config, pod) == "local"


def test_clusters_command_lists_and_stops(facility_config: FacilityConfig,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from facility.cli import main

    client = connect("listed", workers=1, config=facility_config)
    name = _handle(client).name
    client.close()
    capsys.readouterr()
    connect("listed", workers=2, wait=False, config=facility_config).close()  # as a setting asks
    told = capsys.readouterr().err
    assert f"facility: cluster {name!r} already runs with 1 worker of 1 thread" in told
    assert f"this asks for 2 workers of 1 thread, 3.00 GiB. Stop it to start it anew " \
           f"(`facility clusters stop {name}`)" in told
    config_arg = ["--config", str(facility_config.home / "facility.yaml")]
    assert main([*config_arg, "clusters"]) == 0
    listing = capsys.readouterr().out
    assert name in listing
    assert "running" in listing
    address = _handle(client).backend.running().scheduler_address
    assert f"{name}: scheduler {address}, dashboard http" in listing  # whole, on a line of its own
    table = [line for line in listing.splitlines() if not line.startswith(f"{name}: ")]
    assert max(map(len, table)) <= 100
    assert main([*config_arg, "clusters", "stop", "nosuch"]) == 2
    assert "no cluster named nosuch" in capsys.readouterr().err
    assert main([*config_arg, "clusters", "stop", name]) == 0
    assert f"stopped: {name}" in capsys.readouterr().out
    assert _handle(client).backend.running() is None


def test_lab_sidebar_creates_scales_and_stops_a_facility_cluster(
        facility_config: FacilityConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    import dask

    from facility.cluster.lab import LABEXTENSION_ENV, LabCluster

    for key, value in {**LABEXTENSION_ENV, "FACILITY_CLUSTER__LIMITS__DEFAULT__WORKERS": "2",
                       "FACILITY_CONFIG": str(facility_config.home / "facility.yaml")}.items():
        monkeypatch.setenv(key, value)
    dask.config.refresh()

    async def sidebar() -> tuple[dict, dict, dict, bool]:
        # dask-labextension builds its manager as it is imported, on this thread's event loop:
        # imported here, that is the running one whatever earlier tests left behind
        from dask_labextension.manager import make_cluster, make_cluster_model

        cluster, _ = await make_cluster({"workers": 1})
        assert isinstance(cluster, LabCluster)
        deadline = time.monotonic() + 60
        while len(cluster.scheduler_info["workers"]) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        first = make_cluster_model("id", "lab", cluster, None)
        await cluster.scale(5)  # the sidebar is held to the same limits: 2 workers
        while len(cluster.scheduler_info["workers"]) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
        second = make_cluster_model("id", "lab", cluster, None)
        adaptive = make_cluster_model("id", "lab", cluster, cluster.adapt(minimum=1, maximum=9))
        assert cluster.resizing is not None
        await cluster.resizing
        backend = cluster.backend
        await cluster.close()
        return first, second, adaptive, backend is not None and backend.running() is None

    try:
        first, second, adaptive, stopped = asyncio.run(sidebar())
    finally:
        dask.config.refresh()
    assert first["scheduler_address"].startswith("facility://")  # the cluster's name
    assert first["dashboard_link"].startswith("http://127.0.0.1:")
    assert (first["workers"], second["workers"]) == (1, 2)
    assert adaptive["adapt"] == {"minimum": 1, "maximum": 2}
    assert stopped


def test_lab_sidebar_lists_a_notebooks_cluster_inserts_code_that_connects_and_forgets_it(
        facility_config: FacilityConfig, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """dask-labextension's own manager, kept in step by the facility: a cluster that a notebook
    made with connect() is listed (with an id the extension's routes accept), the code of the
    sidebar's <> button connects to it, and once it stops the sidebar lets go of it."""
    import asyncio
    import logging
    import re

    from facility.cluster.lab import ClusterSidebar, LabCluster

    monkeypatch.setenv("FACILITY_CONFIG", str(facility_config.home / "facility.yaml"))
    monkeypatch.setenv("JUPYTERHUB_USER", "sidebar-user")
    notebook = connect("from-a-notebook", workers=1, config=facility_config)
    name = _handle(notebook).name
    # what the <> button inserts (dask-labextension's getClientCode)
    inserted = 'from dask.distributed import Client\n\nclient = Client("{address}")\nclient'

    async def sidebar() -> tuple[list[dict], dict, list[dict]]:
        # dask-labextension builds its manager as it is imported, on this thread's event loop:
        # imported here, that is the running one whatever earlier tests left behind
        from dask_labextension.manager import DaskClusterManager

        manager = DaskClusterManager()
        await manager
        watcher = ClusterSidebar(manager, facility_config)
        await watcher.sync()
        listed = manager.list_clusters()
        [model] = listed
        cluster = manager._clusters[model["id"]]
        assert isinstance(cluster, LabCluster)
        await watcher.sync()  # listed once, however often it looks
        assert len(manager.list_clusters()) == 1
        namespace: dict[str, Any] = {}
        await asyncio.to_thread(exec, inserted.format(address=model["scheduler_address"]), namespace)
        try:
            answer = await asyncio.to_thread(lambda: namespace["client"].submit(sum, [1, 2]).result())
        finally:
            await asyncio.to_thread(namespace["client"].close)
        await asyncio.to_thread(_handle(notebook).close)
        caplog.clear()
        await watcher.sync()
        after = manager.list_clusters()
        await asyncio.sleep(3)  # nothing polls the dead address
        return listed, {"answer": answer, "closed": cluster.client.status}, after

    with caplog.at_level(logging.INFO):
        listed, used, after = asyncio.run(sidebar())
    [model] = listed
    assert model["name"] == name
    assert re.fullmatch(r"\w+-\w+-\w+-\w+-\w+", model["id"])  # the extension's route for one cluster
    assert model["scheduler_address"] == f"facility://{name}"
    assert model["workers"] == 1
    assert model["dashboard_link"].startswith("http://127.0.0.1:")
    assert used == {"answer": 3, "closed": "closed"}
    assert after == []
    assert f"cluster {name} has stopped" in caplog.text
    assert "Traceback" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_cluster_names_keep_their_own_part_when_the_user_name_is_long() -> None:
    from facility.cluster.connect import cluster_name

    long_user = Identity("a" * 44 + ".x")
    names = {cluster_name(long_user, f"job-{n}") for n in (1, 12, 123)}
    assert len(names) == 3
    assert all(len(n) <= 50 and n[-1] != "-" and "-job-" in n for n in names)
    assert cluster_name(Identity("Alice.Smith"), "Z peak") == "alice-smith---2ece8250-z-peak"


def test_asking_a_running_cluster_for_another_size_says_it_keeps_its_own(
        facility_config: FacilityConfig, capsys: pytest.CaptureFixture[str]) -> None:
    from facility.cluster.base import backend_for

    backend_for(facility_config).start()
    capsys.readouterr()
    backend_for(facility_config).start()
    assert "already runs with" not in capsys.readouterr().err  # the same request: nothing to say
    bigger = facility_config.model_copy(deep=True)
    bigger.cluster.max_workers = facility_config.cluster.max_workers + 1
    backend = backend_for(bigger)
    backend.start()
    told = capsys.readouterr().err
    assert f"cluster {backend.name!r} already runs with" in told
    assert "this asks for" in told
    assert f"facility clusters stop {backend.name}" in told
