"""``facility://<cluster>``: a Dask address that names one of the user's clusters.

A facility cluster speaks mutual TLS with credentials of its own, so a bare
``Client("tls://…")`` cannot reach it. Code that knows only an address (the Dask sidebar of
JupyterLab inserts ``Client("<scheduler address>")`` into a notebook) gets
``facility://<cluster name>`` instead: Dask finds this module through its
``distributed.comm.backends`` entry point, and the connection goes to the cluster's scheduler
with the cluster's credentials, which only its user can read::

    from dask.distributed import Client
    client = Client("facility://alice-zpeak")      # the same as facility.connect("zpeak")'s

Nothing listens on such an address: schedulers and workers keep their ``tls://`` ones.
"""

from __future__ import annotations

from typing import Any

from distributed.comm.addressing import parse_address
from distributed.comm.core import Comm, Connector
from distributed.comm.registry import Backend, get_backend

from facility.cluster.base import ClusterError, backend_for
from facility.cluster.limits import Identity
from facility.config import load_config

SCHEME = "facility"


def cluster_address(name: str) -> str:
    return f"{SCHEME}://{name}"


def resolve(name: str) -> tuple[str, dict[str, Any]]:
    """The scheduler address of the user's running cluster ``name`` and the connection
    arguments of its credentials."""
    backend = backend_for(load_config(), name, identity=Identity.current())
    info = backend.running()
    if info is None:
        raise ClusterError(f"cluster {name!r} is not running; `facility clusters` lists yours, "
                           f"`facility.connect({name!r})` starts one")
    return info.scheduler_address, backend.security.get_connection_args("client")


class FacilityConnector(Connector):
    async def connect(self, address: str, deserialize: bool = True, **connection_args: Any) -> Comm:
        target, own_args = resolve(address)
        scheme, loc = parse_address(target)
        connector = get_backend(scheme).get_connector()
        return await connector.connect(loc, deserialize=deserialize, **own_args)


class FacilityBackend(Backend):
    """Connects only: a name stands for its cluster's scheduler."""

    def get_connector(self) -> Connector:
        return FacilityConnector()

    def get_listener(self, loc: str, handle_comm: Any, deserialize: bool,
                     **connection_args: Any) -> Any:
        raise ValueError(f"{SCHEME}:// addresses name clusters; nothing listens on them")

    def _scheduler(self, loc: str) -> tuple[Backend, str]:
        scheme, target = parse_address(resolve(loc)[0])
        return get_backend(scheme), target

    def get_address_host(self, loc: str) -> str:
        backend, target = self._scheduler(loc)
        return str(backend.get_address_host(target))

    def get_address_host_port(self, loc: str) -> tuple[str, int]:
        backend, target = self._scheduler(loc)
        host, port = backend.get_address_host_port(target)
        return str(host), int(port)

    def resolve_address(self, loc: str) -> str:
        return loc

    def get_local_address_for(self, loc: str) -> str:
        backend, target = self._scheduler(loc)
        return str(backend.get_local_address_for(target))
