"""Local cluster backend: a Dask scheduler process and worker processes on this machine.

``python -m facility.cluster.local NAME`` is the cluster process: it runs the scheduler, and
adaptively starts and stops worker processes (each behind a nanny that restarts it if it dies)
between the configured minimum and maximum. The backend runs it as an embedded-facility service,
so it outlives the notebook or command that asked for it, and finds it again by its record.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path

import dask
from distributed import Nanny, Scheduler, SpecCluster

from facility.cluster.base import ClusterBackend, ClusterError, ClusterInfo
from facility.config import FacilityConfig, load_config
from facility.embedded.services import Service, ServiceError, Supervisor


def _address_file(config: FacilityConfig, name: str) -> Path:
    return config.state_path / "run" / f"dask-{name}.address.json"


class LocalBackend(ClusterBackend):
    """Scheduler and workers as separate local processes, adaptive between min and max."""

    backend_name = "local"

    @property
    def service_name(self) -> str:
        return f"dask-{self.name}"

    def service(self) -> Service:
        address_file = _address_file(self.config, self.name)
        return Service(
            name=self.service_name,
            argv=[sys.executable, "-m", "facility.cluster.local", self.name],
            ready=address_file.exists,
            start_timeout=self.config.cluster.worker_start_timeout,
            description=(f"Dask cluster {self.name!r}: {self.config.cluster.min_workers}.."
                         f"{self.config.cluster.max_workers} workers"),
        )

    def _config_file(self) -> Path:
        """The cluster process reads the exact configuration this process resolved."""
        path = self.config.state_path / "run" / f"dask-{self.name}.config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config.model_dump_json())
        return path

    def start(self) -> ClusterInfo:
        running = self.running()
        if running is not None:
            return running
        _address_file(self.config, self.name).unlink(missing_ok=True)
        service = self.service()
        service.argv.append(str(self._config_file()))
        try:
            Supervisor(self.config.state_path).start(service)
        except ServiceError as exc:
            raise ClusterError(str(exc)) from exc
        info = self.running()
        if info is None:
            raise ClusterError(f"cluster {self.name!r} started but wrote no address")
        return info

    def running(self) -> ClusterInfo | None:
        if Supervisor(self.config.state_path).process(self.service_name) is None:
            return None
        try:
            record = json.loads(_address_file(self.config, self.name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return ClusterInfo(self.name, self.backend_name, record["address"], record["dashboard"],
                           record.get("workers", 0))

    def stop(self) -> bool:
        stopped = Supervisor(self.config.state_path).stop(self.service_name)
        _address_file(self.config, self.name).unlink(missing_ok=True)
        return stopped


def worker_environment(config: FacilityConfig) -> dict[str, int | None]:
    """What the nannies set before starting a worker process (None leaves a variable unset)."""
    return {"MALLOC_TRIM_THRESHOLD_": config.cluster.malloc_trim_threshold}


def worker_spec(config: FacilityConfig) -> dict:
    return {
        "cls": Nanny,
        "options": {
            "nthreads": config.cluster.threads_per_worker,
            "memory_limit": config.cluster.memory_limit,
            "host": "127.0.0.1",
        },
    }


async def serve(config: FacilityConfig, name: str) -> None:
    """Run the scheduler and adaptive workers until SIGTERM/SIGINT."""
    for variable, value in worker_environment(config).items():
        dask.config.set({f"distributed.nanny.pre-spawn-environ.{variable}": value})
    scheduler = {
        "cls": Scheduler,
        "options": {
            "host": "127.0.0.1",
            "port": config.cluster.scheduler_port,
            "dashboard_address": f"127.0.0.1:{config.cluster.dashboard_port}",
        },
    }
    async with SpecCluster(workers={}, scheduler=scheduler, worker=worker_spec(config),
                           asynchronous=True, name=name) as cluster:
        cluster.adapt(minimum=config.cluster.min_workers, maximum=config.cluster.max_workers,
                      wait_count=5, interval="500ms")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        info = cluster.scheduler_info
        address_file = _address_file(config, name)
        tmp = address_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "address": cluster.scheduler_address,
            "dashboard": cluster.dashboard_link,
            "workers": len(info.get("workers", {})),
        }))
        tmp.replace(address_file)
        await stop.wait()
        address_file.unlink(missing_ok=True)


def main(argv: list[str]) -> None:
    name = argv[0] if argv else "default"
    config = (FacilityConfig.model_validate_json(Path(argv[1]).read_text()) if len(argv) > 1
              else load_config())
    asyncio.run(serve(config, name))


if __name__ == "__main__":
    main(sys.argv[1:])
