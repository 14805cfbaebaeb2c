"""The cluster backend interface: how a run gets a Dask client, whatever runs the workers.

A backend knows how to bring a cluster up, hand out a client, explain a shortfall of workers and
take it down. The configuration picks the implementation (``cluster.backend``; ``auto`` picks
kubernetes inside a pod where the dask operator is installed, else local); callers never test
which one runs.
"""

from __future__ import annotations

import asyncio
import os
import urllib.parse
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psutil
from distributed import Client
from distributed.security import Security

from facility.cluster.limits import Identity, WorkerRequest, clamp, limits_for, report_clamps
from facility.cluster.security import security_from
from facility.config import FacilityConfig
from facility.errors import InfrastructureError

PROXY_PREFIX_ENV = "JUPYTERHUB_SERVICE_PREFIX"
PUBLIC_URL_ENV = "JUPYTERHUB_PUBLIC_URL"  # set by the hub when it knows its public address

# Imported by every worker process, local or in a pod, before it joins the scheduler: coffea,
# awkward and uproot take seconds of CPU to import. Paid at start, it is part of the wait for
# workers; paid at the first chunk, many workers sharing few cores stop answering the scheduler
# while they import, and their results cannot be fetched. The scheduler imports it too: it
# unpickles every task it is given, and would otherwise import the run engine when the first
# run's first tasks arrive, with every slot waiting. Its ``dask_setup`` then freezes what the
# imports made out of the cycle collector's sight.
ENGINE_PRELOAD = ["facility.processing.dispatch"]
# Schedulers also keep the idle count the facility means (see facility.cluster.idle).
SCHEDULER_PRELOAD = [*ENGINE_PRELOAD, "facility.cluster.idle"]


def clusters_path(config: FacilityConfig) -> Path:
    return config.state_path / "clusters"


def cluster_folder(config: FacilityConfig, name: str) -> Path:
    return clusters_path(config) / name


class ClusterError(InfrastructureError, RuntimeError):
    """A cluster could not be started, reached or resized."""


@dataclass(frozen=True)
class Owner:
    """The process a cluster lives and dies with (a notebook kernel, a command)."""

    pid: int
    create_time: float

    @classmethod
    def this_process(cls) -> Owner:
        return cls(os.getpid(), psutil.Process().create_time())


@dataclass(frozen=True)
class ClusterInfo:
    """What a user needs to find a cluster again."""

    name: str
    backend: str
    scheduler_address: str
    dashboard_host: str | None
    dashboard_port: int | None
    user: str
    owner_pid: int | None = None
    notes: tuple[str, ...] = ()

    def dashboard_link(self, environ: dict[str, str] | None = None) -> str | None:
        """Behind the hub: the notebook server's proxy path; from a terminal: the host itself."""
        if self.dashboard_port is None:
            return None
        env = os.environ if environ is None else environ
        prefix = env.get(PROXY_PREFIX_ENV)
        if prefix:
            local = self.dashboard_host in (None, "127.0.0.1", "localhost")
            target = str(self.dashboard_port) if local else f"{self.dashboard_host}:{self.dashboard_port}"
            return f"{prefix.rstrip('/')}/proxy/{target}/status"
        return f"http://{self.dashboard_host}:{self.dashboard_port}/status"

    def dashboard_url(self, hub_url: str, environ: dict[str, str] | None = None) -> str | None:
        """The dashboard link as an absolute address, to print on a terminal: behind the hub
        the proxy path on the hub's public address (the hub's own ``JUPYTERHUB_PUBLIC_URL``
        when it has one, else ``hub_url``); elsewhere the link is absolute already."""
        env = os.environ if environ is None else environ
        found = self.dashboard_link(environ)
        if found is None or "://" in found:
            return found
        public = urllib.parse.urlsplit(env.get(PUBLIC_URL_ENV) or hub_url)
        return urllib.parse.urlunsplit((public.scheme, public.netloc, found, "", ""))


class ClusterBackend(ABC):
    """One kind of Dask cluster: ``local`` (processes here) or ``kubernetes`` (dask operator)."""

    backend_name: str = "abstract"

    def __init__(self, config: FacilityConfig, name: str = "default",
                 request: WorkerRequest | None = None, owner: Owner | None = None,
                 identity: Identity | None = None, idle_timeout: float | None = None) -> None:
        self.config = config
        self.name = name
        self.request = request or WorkerRequest.from_config(config)
        self.owner = owner
        self.identity = identity or Identity.current()
        self.idle_timeout = config.cluster.idle_timeout if idle_timeout is None else idle_timeout

    @abstractmethod
    def start(self) -> ClusterInfo:
        """Bring the cluster up (idempotent) and describe it."""

    @abstractmethod
    def running(self) -> ClusterInfo | None:
        """The cluster if it runs, else None."""

    @abstractmethod
    def stop(self) -> bool:
        """Take the cluster down; returns whether it was running."""

    @abstractmethod
    def adapt(self, client: Client, minimum: int, maximum: int) -> dict:
        """Grow and shrink with the work between ``minimum`` and ``maximum`` workers."""

    @abstractmethod
    def scale(self, client: Client, n: int) -> dict:
        """Hold ``n`` workers (no more adapting)."""

    @classmethod
    @abstractmethod
    def clusters_of(cls, config: FacilityConfig, identity: Identity) -> list[ClusterBackend]:
        """The user's clusters of this kind that may be running (check with :meth:`running`)."""

    def granted(self, minimum: int, maximum: int) -> WorkerRequest:
        """A resize of this cluster as the owner's limits allow it (every resize goes through
        here: notebook, sidebar, command line)."""
        asked = replace(self.request, min_workers=minimum, max_workers=max(minimum, maximum),
                        notes=())
        limits, source = limits_for(self.config, self.identity)
        granted = clamp(asked, limits, source)
        report_clamps(granted.notes)
        return granted

    async def adapt_async(self, client: Client, minimum: int, maximum: int) -> dict:
        """:meth:`adapt` from an event loop (the notebook server's) without blocking it."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.adapt, client, minimum, maximum)

    async def scale_async(self, client: Client, n: int) -> dict:
        """:meth:`scale` from an event loop without blocking it."""
        return await asyncio.get_running_loop().run_in_executor(None, self.scale, client, n)

    @property
    def folder(self) -> Path:
        """Where this cluster's private files live (credentials, spec, record)."""
        return cluster_folder(self.config, self.name)

    @property
    def security(self) -> Security:
        """The credentials a client of this cluster presents."""
        return security_from(self.folder)

    def client(self, timeout: float = 30.0) -> Client:
        """A client connected to the (started) cluster."""
        info = self.start()
        return Client(info.scheduler_address, timeout=timeout, set_as_default=False,
                      security=self.security)

    def stopped_because(self) -> str | None:
        """Why the cluster stopped, where the implementation can tell (its own log, events)."""
        return None

    def unreachable(self, address: str, exc: OSError) -> ClusterError:
        """The error for a cluster that stopped answering its client, with why if known."""
        why = self.stopped_because() or str(exc)
        return ClusterError(f"cluster {self.name!r} at {address} stopped answering: {why}")

    def explain(self, client: Any) -> list[str]:
        """Why workers are missing; the base knows the limits, implementations add the rest."""
        info = self.running()
        return [f"limit: {note}" for note in (info.notes if info else self.request.notes)]

    def wait_for_workers(self, client: Client, n: int, timeout: float | None = None) -> None:
        """Block until ``n`` workers are connected, or explain why not."""
        timeout = timeout if timeout is not None else self.config.cluster.worker_start_timeout
        try:
            client.wait_for_workers(n, timeout=timeout)
        except TimeoutError as exc:
            have = len(client.scheduler_info(n_workers=-1)["workers"])
            why = "; ".join(self.explain(client)) or "no reason found"
            raise ClusterError(
                f"cluster {self.name!r} has {have} of {n} workers after {timeout:.0f} s: {why}"
            ) from exc


def in_kubernetes_pod(environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return "KUBERNETES_SERVICE_HOST" in env


def backend_name(config: FacilityConfig, environ: dict[str, str] | None = None) -> str:
    """``auto`` means kubernetes inside a pod where the operator is installed, else local."""
    chosen = config.cluster.backend
    if chosen != "auto":
        return chosen
    return "kubernetes" if in_kubernetes_pod(environ) and config.cluster.kubernetes.operator \
        else "local"


def backend_class(config: FacilityConfig) -> type[ClusterBackend]:
    """The kind of backend the configuration selects."""
    from facility.cluster.kubernetes import KubernetesBackend
    from facility.cluster.local import LocalBackend

    backends: dict[str, type[ClusterBackend]] = {LocalBackend.backend_name: LocalBackend,
                                                 KubernetesBackend.backend_name: KubernetesBackend}
    return backends[backend_name(config)]


def backend_for(config: FacilityConfig, name: str = "default", **options: Any) -> ClusterBackend:
    """The backend the configuration selects."""
    return backend_class(config)(config, name, **options)


def running_clusters(config: FacilityConfig, identity: Identity | None = None
                     ) -> list[tuple[ClusterBackend, ClusterInfo]]:
    """The user's running clusters, whoever started them (a notebook, a command, the sidebar)."""
    who = identity or Identity.current()
    found = []
    for backend in backend_class(config).clusters_of(config, who):
        info = backend.running()
        if info is not None:
            found.append((backend, info))
    return found
