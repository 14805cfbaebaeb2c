"""The facility's clusters in JupyterLab's Dask sidebar (dask-labextension).

The extension runs in the notebook server and builds clusters through a configurable factory;
:data:`LABEXTENSION_ENV` points that factory at :class:`LabCluster`, so "+ NEW" in the sidebar
creates a facility cluster of the logged-in user (within their limits, owned by their server,
TLS like any other), and scale / adapt / shutdown in the sidebar act on it.

The extension lists only the clusters it made. :class:`ClusterSidebar` (started by the server
extension :mod:`facility.hub.lab`) keeps its list equal to the user's running clusters: one
made in a notebook with ``facility.connect()`` or from a terminal appears, and one that stopped
(closed, idle, its notebook gone) is dropped with its client, instead of being polled at a dead
address. A cluster's address in the sidebar is ``facility://<name>`` (:mod:`facility.cluster.address`):
the code that its ``<>`` button inserts, ``Client("facility://<name>")``, connects with the
cluster's credentials.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from distributed import Client

from facility.cluster.address import cluster_address
from facility.cluster.base import ClusterBackend, ClusterInfo, running_clusters
from facility.cluster.connect import FacilityCluster, user_backend
from facility.cluster.limits import Identity
from facility.config import FacilityConfig, load_config

REFRESH_SECONDS = 1.0
# how often the sidebar's list is matched against the user's running clusters
SYNC_SECONDS = 3.0

# Dask reads DASK_* variables as configuration: the hub sets these for every notebook server.
LABEXTENSION_ENV = {
    "DASK_LABEXTENSION__FACTORY__MODULE": "facility.cluster.lab",
    "DASK_LABEXTENSION__FACTORY__CLASS": "LabCluster",
}

log = logging.getLogger("facility.lab")


@dataclass
class AdaptiveRange:
    """What the sidebar shows of an adaptive cluster."""

    minimum: int
    maximum: int


# clusters that "+ NEW" made in this server: the extension lists them itself
MADE_BY_THE_SIDEBAR: set[str] = set()


class LabCluster:
    """A facility cluster with the asynchronous interface dask-labextension expects: one the
    sidebar starts (awaiting it starts it), or a running one the sidebar shows (:meth:`attach`)."""

    def __init__(self, *args: Any, asynchronous: bool = True, name: str | None = None,
                 **asked: Any) -> None:
        self.asked = asked
        self.requested_name = name
        self.backend: ClusterBackend | None = None
        self.info: ClusterInfo | None = None
        self.client: Client | None = None
        self.resizing: asyncio.Future | None = None
        self.identity: dict = {"workers": {}}
        self.watching: asyncio.Task | None = None

    @classmethod
    async def attach(cls, backend: ClusterBackend, info: ClusterInfo) -> LabCluster:
        """A running cluster, whoever started it."""
        cluster = cls(name=info.name)
        cluster.backend, cluster.info = backend, info
        await cluster._connect()
        return cluster

    def __await__(self) -> Generator[Any, None, LabCluster]:
        return self._start().__await__()

    async def _start(self) -> LabCluster:
        loop = asyncio.get_running_loop()
        config = await loop.run_in_executor(None, load_config)
        self.backend = await loop.run_in_executor(
            None, user_backend, config, self.requested_name, self.asked)
        MADE_BY_THE_SIDEBAR.add(self.backend.name)
        self.info = await loop.run_in_executor(None, self.backend.start)
        await self._connect()
        return self

    async def _connect(self) -> None:
        assert self.info is not None
        assert self.backend is not None
        # given the cluster, the client closes when the cluster stops (no reconnecting)
        self.client = await Client(FacilityCluster(self.backend, self.info),
                                   security=self.backend.security, asynchronous=True,
                                   set_as_default=False)
        await self._refresh()
        self.watching = asyncio.create_task(self._watch())

    @property
    def name(self) -> str:
        return self._parts()[1].name

    async def _refresh(self) -> None:
        scheduler = self.client.scheduler if self.client is not None else None
        if scheduler is not None:
            self.identity = await scheduler.identity(n_workers=-1)

    async def _watch(self) -> None:
        """The sidebar reads worker counts synchronously: keep a fresh copy at hand."""
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            try:
                await self._refresh()
            except OSError:
                return

    def _parts(self) -> tuple[ClusterBackend, ClusterInfo, Client]:
        if self.backend is None or self.info is None or self.client is None:
            raise RuntimeError("the cluster has not been started; await it first")
        return self.backend, self.info, self.client

    @property
    def scheduler_address(self) -> str:
        """What the sidebar shows and puts into ``Client(...)``: the cluster's name as an address
        (its scheduler's own ``tls://`` address is useless without the cluster's credentials)."""
        return cluster_address(self._parts()[1].name)

    @property
    def dashboard_link(self) -> str | None:
        return self._parts()[1].dashboard_link()

    @property
    def scheduler_info(self) -> dict:
        return self.identity

    async def scale(self, n: int) -> dict:
        backend, _, client = self._parts()
        return await backend.scale_async(client, backend.granted(n, n).max_workers)

    def adapt(self, minimum: int = 0, maximum: int = 1, **options: Any) -> AdaptiveRange:
        """The sidebar does not await this; the change is sent in the background."""
        backend, _, client = self._parts()
        granted = backend.granted(minimum, maximum)
        self.resizing = asyncio.ensure_future(
            backend.adapt_async(client, granted.min_workers, granted.max_workers))
        return AdaptiveRange(granted.min_workers, granted.max_workers)

    async def disconnect(self) -> None:
        """Let go of the cluster (it has stopped, or runs on for its owner)."""
        if self.watching is not None:
            self.watching.cancel()
        if self.client is not None:
            with contextlib.suppress(Exception):  # a client of a stopped scheduler may complain
                await self.client.close(timeout=2)

    async def close(self) -> None:
        """The sidebar's "shutdown": the cluster stops, whoever started it."""
        backend, _, _ = self._parts()
        await self.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, backend.stop)


def sidebar_id(name: str) -> str:
    """The id of a cluster the sidebar did not make: the extension's routes take ids shaped like
    its own (UUIDs); the same cluster keeps the same one."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, cluster_address(name)))


class ClusterSidebar:
    """Keeps dask-labextension's cluster manager listing the user's running clusters.

    The manager has no way to add a cluster it did not start, nor to drop one; this keeps its
    three tables (``_clusters``, ``_cluster_names``, ``_adaptives``) as its own methods do."""

    def __init__(self, manager: Any, config: FacilityConfig | None = None,
                 identity: Identity | None = None) -> None:
        self.manager = manager
        self.config = config
        self.identity = identity or Identity.current()
        self.task: asyncio.Task | None = None

    def _shown(self) -> dict[str, LabCluster]:
        return {cid: c for cid, c in self.manager._clusters.items() if isinstance(c, LabCluster)}

    async def sync(self) -> None:
        loop = asyncio.get_running_loop()
        if self.config is None:
            self.config = await loop.run_in_executor(None, load_config)
        running = {info.name: (backend, info) for backend, info in await loop.run_in_executor(
            None, running_clusters, self.config, self.identity)}
        shown = self._shown()
        for cluster_id, cluster in shown.items():
            if cluster.info is not None and cluster.info.name not in running:
                log.info("facility: cluster %s has stopped; the Dask sidebar lets go of it",
                         cluster.info.name)
                self._forget(cluster_id)
                await cluster.disconnect()
        names = {c.info.name for c in shown.values() if c.info is not None}
        for name, (backend, info) in running.items():
            if name in names or name in MADE_BY_THE_SIDEBAR:
                continue  # the sidebar lists what it made itself (or is making now)
            try:
                cluster = await LabCluster.attach(backend, info)
            except (OSError, TimeoutError) as exc:
                log.info("facility: cluster %s is not reachable yet: %s", name, exc)
                continue
            cluster_id = sidebar_id(name)
            self.manager._clusters[cluster_id] = cluster
            self.manager._cluster_names[cluster_id] = name

    def _forget(self, cluster_id: str) -> None:
        cluster = self.manager._clusters.get(cluster_id)
        if isinstance(cluster, LabCluster) and cluster.info is not None:
            MADE_BY_THE_SIDEBAR.discard(cluster.info.name)
        for table in (self.manager._clusters, self.manager._cluster_names, self.manager._adaptives):
            table.pop(cluster_id, None)

    async def run(self, every: float = SYNC_SECONDS) -> None:
        """Sync every ``every`` seconds; a failure is logged once, not at every look."""
        failed = None
        while True:
            try:
                await self.sync()
                failed = None
            except Exception as exc:
                if repr(exc) != failed:
                    log.warning("facility: could not list the Dask clusters", exc_info=True)
                failed = repr(exc)
            await asyncio.sleep(every)

    def start(self) -> asyncio.Task:
        self.task = asyncio.ensure_future(self.run())
        return self.task
