"""Local cluster backend: a Dask scheduler process and worker processes on this machine.

``python -m facility.cluster.local FOLDER`` is the cluster process: it runs the scheduler and
adaptively starts and stops worker processes (each behind a nanny that restarts it if it dies)
between a minimum and a maximum. It runs as a supervised service, so the command or notebook that
asked for it can go away and find it again, and it ends by itself when

* its owner process dies (a notebook kernel that exits or is killed): no orphan is left behind;
* it had no work for ``idle_timeout`` seconds;
* it is stopped (``facility clusters stop``, ``facility down``, ``cluster.close()``).

Every cluster speaks mutual TLS with credentials of its own (see :mod:`facility.cluster.security`).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dask
import psutil
from dask.utils import format_bytes
from distributed import Nanny, Scheduler, SpecCluster
from distributed.security import Security

from facility.cluster.allocator import allocator_environment
from facility.cluster.base import (
    ENGINE_PRELOAD,
    SCHEDULER_PRELOAD,
    ClusterBackend,
    ClusterError,
    ClusterInfo,
    clusters_path,
)
from facility.cluster.limits import Identity, WorkerRequest
from facility.cluster.security import create_credentials, security_from
from facility.config import FacilityConfig
from facility.embedded.services import (
    Service,
    ServiceError,
    Supervisor,
    file_lock,
    last_start,
    live_process,
    tail,
)
from facility.machine import usable_cores

OWNER_POLL_SECONDS = 0.5


def local_gpus() -> int:
    """GPUs this machine has (NVIDIA), 0 when none or no driver."""
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        listing = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return sum(1 for line in listing.stdout.splitlines() if line.startswith("GPU "))


class LocalBackend(ClusterBackend):
    """Scheduler and workers as separate local processes, adaptive between min and max."""

    backend_name = "local"

    @property
    def service_name(self) -> str:
        return f"dask-{self.name}"

    def service(self) -> Service:
        return Service(
            name=self.service_name,
            argv=[sys.executable, "-m", "facility.cluster.local", str(self.folder)],
            ready=(self.folder / "record.json").exists,
            start_timeout=self.config.cluster.worker_start_timeout,
            description=f"Dask cluster {self.name!r}: {self.request.describe()}",
        )

    def check_request(self) -> None:
        have = local_gpus() if self.request.gpus else 0
        if have < self.request.gpus:
            raise ClusterError(
                f"cluster {self.name!r}: {self.request.gpus} GPU(s) per worker asked for, but this "
                f"machine has {have}; ask for gpus=0 here, or use a GPU environment")

    def start(self) -> ClusterInfo:
        """Start the cluster unless it runs. Commands started together take turns through a
        lock: the first starts it, the others wait and attach to it."""
        running = self.running()
        if running is not None:
            self._tell_if_sized_otherwise()
            return running
        lock = clusters_path(self.config) / f"{self.name}.lock"
        with file_lock(lock, 2 * self.config.cluster.worker_start_timeout,
                       f"cluster {self.name!r} to start"):
            return self._start_locked()

    def _tell_if_sized_otherwise(self) -> None:
        """A running cluster keeps the size it started with: say so when this request (the
        configuration, FACILITY_CLUSTER__* settings) asks for another one."""
        try:
            started = WorkerRequest.from_record(
                json.loads((self.folder / "spec.json").read_text())["request"])
        except (OSError, KeyError, ValueError, TypeError):
            return
        if started.describe() != self.request.describe():
            print(f"facility: cluster {self.name!r} already runs with {started.describe()}; "
                  f"this asks for {self.request.describe()}. Stop it to start it anew "
                  f"(`facility clusters stop {self.name}`).", file=sys.stderr)

    def _start_locked(self) -> ClusterInfo:
        running = self.running() or self._starting_elsewhere()
        if running is not None:
            return running
        self.check_request()
        (self.folder / "record.json").unlink(missing_ok=True)
        create_credentials(self.folder)
        (self.folder / "spec.json").write_text(json.dumps({
            "name": self.name, "config": self.config.model_dump(mode="json"),
            "request": asdict(self.request), "owner": asdict(self.owner) if self.owner else None,
            "user": self.identity.user, "idle_timeout": self.idle_timeout,
        }))
        try:
            Supervisor(self.config.state_path).start(self.service())
        except ServiceError as exc:
            raise ClusterError(str(exc)) from exc
        info = self.running()
        if info is None:
            raise ClusterError(f"cluster {self.name!r} started but wrote no address")
        return info

    def _starting_elsewhere(self) -> ClusterInfo | None:
        """A cluster process without a record: another command is starting it (wait for it),
        or it was left by an older facility without this folder (replace it)."""
        supervisor = Supervisor(self.config.state_path)
        if supervisor.process(self.service_name) is None:
            return None
        if (self.folder / "spec.json").exists():
            deadline = time.monotonic() + self.config.cluster.worker_start_timeout
            while time.monotonic() < deadline and supervisor.process(self.service_name):
                if (info := self.running()) is not None:
                    return info
                time.sleep(0.2)
        supervisor.stop(self.service_name)
        return None

    def _record(self) -> dict | None:
        if Supervisor(self.config.state_path).process(self.service_name) is None:
            return None
        try:
            return json.loads((self.folder / "record.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def running(self) -> ClusterInfo | None:
        record = self._record()
        if record is None:
            return None
        return ClusterInfo(self.name, self.backend_name, record["address"], record["dashboard_host"],
                           record["dashboard_port"], record["user"], record.get("owner_pid"),
                           tuple(record.get("notes", ())))

    def stop(self) -> bool:
        stopped = Supervisor(self.config.state_path).stop(self.service_name)
        shutil.rmtree(self.folder, ignore_errors=True)
        return stopped

    @classmethod
    def clusters_of(cls, config: FacilityConfig, identity: Identity) -> list[ClusterBackend]:
        return [c for c in local_clusters(config) if c.identity.user == identity.user]

    def adapt(self, client: Any, minimum: int, maximum: int) -> dict:
        return client.sync(client.scheduler.facility_adapt, minimum=minimum, maximum=maximum)

    def scale(self, client: Any, n: int) -> dict:
        return client.sync(client.scheduler.facility_scale, n=n)

    async def adapt_async(self, client: Any, minimum: int, maximum: int) -> dict:
        return await client.scheduler.facility_adapt(minimum=minimum, maximum=maximum)

    async def scale_async(self, client: Any, n: int) -> dict:
        return await client.scheduler.facility_scale(n=n)

    def explain(self, client: Any) -> list[str]:
        reasons = super().explain(client)
        workers = len(client.scheduler_info(n_workers=-1)["workers"])
        want = max(self.request.min_workers, 1)
        if workers >= want:
            return reasons
        needed = self.request.memory * want
        available = psutil.virtual_memory().available
        if available < needed:
            reasons.append(f"this machine has {format_bytes(available)} of memory free, "
                           f"{want} workers of {format_bytes(self.request.memory)} need "
                           f"{format_bytes(needed)}")
        cores = usable_cores()
        if self.request.threads * want > cores:
            reasons.append(f"{want} workers of {self.request.threads} threads oversubscribe the "
                           f"{cores} cores this process may use")
        log = Supervisor(self.config.state_path).log_path(self.service_name)
        problems = [line for line in tail(log, 200).splitlines()
                    if any(sign in line for sign in ("Error", "failed", "Killed", "Traceback"))]
        if problems:
            reasons.append("the cluster's log reports: " + " | ".join(problems[-3:]))
        if len(reasons) == 0:
            reasons.append(f"{workers} of {want} workers are up; the others are still starting "
                           f"(log: {log})")
        return reasons

    def stopped_because(self) -> str | None:
        """The reason the cluster process logged when it began to stop (it may still be
        closing its workers), or None while it has not."""
        log = Supervisor(self.config.state_path).log_path(self.service_name)
        said = [line for line in last_start(log) if STOP_LINE in line]
        return f"{said[-1].strip()} (log: {log})" if said else None


def local_clusters(config: FacilityConfig) -> list[LocalBackend]:
    """Every local cluster that has a folder, running or not."""
    root = clusters_path(config)
    if not root.exists():
        return []
    found = []
    for spec in sorted(root.glob("*/spec.json")):
        try:
            data = json.loads(spec.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        request = WorkerRequest.from_record(data["request"])
        found.append(LocalBackend(config, data["name"], request,
                                  identity=Identity(data.get("user", "unknown"))))
    return found


# ---------------------------------------------------------------------------------------------
# the cluster process


def worker_environment(config: FacilityConfig) -> dict[str, int | str | None]:
    """What the nannies set before starting a worker process (None leaves a variable unset):
    the object store's endpoint for s3:// replicas (credentials come from the user's own
    environment, which the workers inherit), the data servers' CA and the token file, and the
    allocator's thresholds (see :mod:`facility.cluster.allocator`)."""
    from facility.data.access import reader_environment
    from facility.data.object_store import worker_credentials

    return {**allocator_environment(config.cluster),
            "AWS_ENDPOINT_URL_S3": config.s3_endpoint(), **worker_credentials(config),
            **{k: v for k, v in reader_environment(config).items() if k not in os.environ}}


STOP_LINE = "stopping:"  # the cluster's last word in its log, read back by stopped_because


def worker_spec(request: WorkerRequest, security: Security) -> dict:
    options: dict[str, Any] = {"nthreads": request.threads, "memory_limit": request.memory,
                               "host": "127.0.0.1", "security": security,
                               "protocol": "tls", "preload": ENGINE_PRELOAD}
    if request.gpus:
        options["resources"] = {"GPU": request.gpus}
    return {"cls": Nanny, "options": options}


def scheduler_spec(config: FacilityConfig, security: Security, idle_timeout: float,
                   fixed_ports: bool) -> dict:
    """The facility's own cluster listens on the configured ports, users' clusters on free ones."""
    port = config.cluster.scheduler_port if fixed_ports else 0
    dashboard = config.cluster.dashboard_port if fixed_ports else 0
    return {"cls": Scheduler, "options": {
        "host": "127.0.0.1", "port": port, "protocol": "tls",
        "dashboard_address": f"127.0.0.1:{dashboard}", "security": security,
        "idle_timeout": idle_timeout or None, "preload": SCHEDULER_PRELOAD,
    }}


def _owner_alive(owner: dict | None) -> bool:
    return owner is None or live_process(owner) is not None


def _scheduler(cluster: SpecCluster) -> Scheduler:
    scheduler = cluster.scheduler
    if scheduler is None:
        raise ClusterError("the cluster has no scheduler")
    return scheduler


def _install_controls(cluster: SpecCluster) -> None:
    """Let clients resize the cluster through the scheduler they already trust (TLS)."""

    def adapt(minimum: int, maximum: int) -> dict:
        cluster.adapt(minimum=minimum, maximum=maximum, wait_count=5, interval="500ms")
        return {"minimum": minimum, "maximum": maximum}

    def scale(n: int) -> dict:
        if cluster._adaptive is not None:
            cluster._adaptive.stop()
        cluster.scale(n)
        return {"workers": n}

    _scheduler(cluster).handlers["facility_adapt"] = adapt
    _scheduler(cluster).handlers["facility_scale"] = scale


async def _until_done(cluster: SpecCluster, owner: dict | None, stop: asyncio.Event) -> str:
    while not stop.is_set():
        if not _owner_alive(owner):
            return f"owner process {owner['pid'] if owner else '?'} is gone"
        if _scheduler(cluster).status.name in ("closing", "closed", "closing_gracefully"):
            return "the scheduler closed (idle timeout or shutdown)"
        try:
            await asyncio.wait_for(stop.wait(), OWNER_POLL_SECONDS)
        except TimeoutError:
            continue
    return "asked to stop"


async def serve(folder: Path) -> None:
    """Run the scheduler and adaptive workers until stopped, idle, or orphaned."""
    spec = json.loads((folder / "spec.json").read_text())
    config = FacilityConfig.model_validate(spec["config"])
    request = WorkerRequest.from_record(spec["request"])
    for variable, value in worker_environment(config).items():
        dask.config.set({f"distributed.nanny.pre-spawn-environ.{variable}": value})
    security = security_from(folder)
    idle = spec.get("idle_timeout", config.cluster.idle_timeout)
    fixed_ports = spec.get("owner") is None
    async with SpecCluster(workers={}, scheduler=scheduler_spec(config, security, idle, fixed_ports),
                           worker=worker_spec(request, security), security=security,
                           asynchronous=True, name=spec["name"]) as cluster:
        cluster.adapt(minimum=request.min_workers, maximum=request.max_workers,
                      wait_count=5, interval="500ms")
        _install_controls(cluster)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        _write_record(folder, cluster, spec, request)
        reason = await _until_done(cluster, spec.get("owner"), stop)
        print(f"cluster {spec['name']} {STOP_LINE} {reason}", flush=True)
        (folder / "record.json").unlink(missing_ok=True)


def _write_record(folder: Path, cluster: SpecCluster, spec: dict, request: WorkerRequest) -> None:
    dashboard = _scheduler(cluster).services.get("dashboard")
    port = dashboard.port if dashboard is not None else None
    record = {"address": cluster.scheduler_address, "dashboard_host": "127.0.0.1",
              "dashboard_port": port, "user": spec["user"],
              "owner_pid": spec["owner"]["pid"] if spec.get("owner") else None,
              "notes": list(request.notes), "started": time.time()}
    tmp = folder / "record.tmp"
    tmp.write_text(json.dumps(record))
    tmp.replace(folder / "record.json")


def main(argv: list[str]) -> None:
    asyncio.run(serve(Path(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
