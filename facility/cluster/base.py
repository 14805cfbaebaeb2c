"""The cluster backend interface: how a run gets a Dask client, whatever runs the workers.

A backend knows how to bring a cluster up, hand out a client, resize it and take it down. The
configuration picks the implementation (``cluster.backend``); callers never test which one runs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from distributed import Client

from facility.config import FacilityConfig


class ClusterError(RuntimeError):
    """A cluster could not be started, reached or resized."""


@dataclass(frozen=True)
class ClusterInfo:
    """What a user needs to find a cluster again."""

    name: str
    backend: str
    scheduler_address: str
    dashboard_link: str | None
    workers: int


class ClusterBackend(ABC):
    """One kind of Dask cluster. Implementations: ``local`` (processes on this machine)."""

    backend_name: str = "abstract"

    def __init__(self, config: FacilityConfig, name: str = "default") -> None:
        self.config = config
        self.name = name

    @abstractmethod
    def start(self) -> ClusterInfo:
        """Bring the cluster up (idempotent) and describe it."""

    @abstractmethod
    def running(self) -> ClusterInfo | None:
        """The cluster if it runs, else None."""

    @abstractmethod
    def stop(self) -> bool:
        """Take the cluster down; returns whether it was running."""

    def client(self, timeout: float = 30.0) -> Client:
        """A client connected to the (started) cluster."""
        info = self.start()
        return Client(info.scheduler_address, timeout=timeout, set_as_default=False)

    def wait_for_workers(self, client: Client, n: int, timeout: float | None = None) -> None:
        """Block until ``n`` workers are connected, or explain why not."""
        timeout = timeout if timeout is not None else self.config.cluster.worker_start_timeout
        try:
            client.wait_for_workers(n, timeout=timeout)
        except TimeoutError as exc:
            have = len(client.scheduler_info(n_workers=-1)["workers"])
            raise ClusterError(
                f"cluster {self.name!r} has {have} of {n} workers after {timeout:.0f} s"
            ) from exc


def backend_for(config: FacilityConfig, name: str = "default") -> ClusterBackend:
    """The backend the configuration selects."""
    from facility.cluster.local import LocalBackend

    backends: dict[str, type[ClusterBackend]] = {LocalBackend.backend_name: LocalBackend}
    try:
        return backends[config.cluster.backend](config, name)
    except KeyError:
        raise ClusterError(
            f"cluster.backend {config.cluster.backend!r} is not available; choose one of "
            f"{', '.join(sorted(backends))}"
        ) from None
