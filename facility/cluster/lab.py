"""The facility's clusters in JupyterLab's Dask sidebar (dask-labextension).

The extension runs in the notebook server and builds clusters through a configurable factory;
:data:`LABEXTENSION_ENV` points that factory at :class:`LabCluster`, so "+ NEW" in the sidebar
creates a facility cluster of the logged-in user (within their limits, owned by their server,
TLS like any other), and scale / adapt / shutdown in the sidebar act on it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from distributed import Client

from facility.cluster.base import ClusterBackend, ClusterInfo
from facility.cluster.connect import user_backend
from facility.config import load_config

REFRESH_SECONDS = 1.0

# Dask reads DASK_* variables as configuration: the hub sets these for every notebook server.
LABEXTENSION_ENV = {
    "DASK_LABEXTENSION__FACTORY__MODULE": "facility.cluster.lab",
    "DASK_LABEXTENSION__FACTORY__CLASS": "LabCluster",
}


@dataclass
class AdaptiveRange:
    """What the sidebar shows of an adaptive cluster."""

    minimum: int
    maximum: int


class LabCluster:
    """A facility cluster with the asynchronous interface dask-labextension expects."""

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

    def __await__(self) -> Generator[Any, None, LabCluster]:
        return self._start().__await__()

    async def _start(self) -> LabCluster:
        loop = asyncio.get_running_loop()
        config = await loop.run_in_executor(None, load_config)
        self.backend = await loop.run_in_executor(
            None, user_backend, config, self.requested_name, self.asked)
        self.info = await loop.run_in_executor(None, self.backend.start)
        self.client = await Client(self.info.scheduler_address, security=self.backend.security,
                                   asynchronous=True, set_as_default=False)
        await self._refresh()
        self.watching = asyncio.create_task(self._watch())
        return self

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
        return self._parts()[1].scheduler_address

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

    async def close(self) -> None:
        backend, _, client = self._parts()
        if self.watching is not None:
            self.watching.cancel()
        await client.close()
        await asyncio.get_running_loop().run_in_executor(None, backend.stop)
