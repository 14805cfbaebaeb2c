"""The embedded facility: every service of the facility as processes on one machine.

``up`` starts the VO's identity provider (the data servers accept only its tokens), one XRootD
server per served region and the XCache of a region that has one, the object store of a region
that keeps its replicas in a bucket, and the local Dask cluster; ``down`` stops them;
``status`` reports them. Starting twice is harmless: running services are left alone.
"""

from __future__ import annotations

from collections.abc import Callable

from facility.batch.local import LocalRunner
from facility.cluster.base import backend_for
from facility.cluster.local import LocalBackend, local_clusters
from facility.config import FacilityConfig
from facility.data.object_store import store_regions, store_service, upload_region
from facility.data.servers import (
    cache_server,
    cached_regions,
    data_server,
    prepare_data_access,
    remove_outside_admin_folders,
    served_regions,
)
from facility.embedded.services import Service, ServiceState, Supervisor
from facility.hub.embedded import (
    check_prerequisites,
    dev_logins,
    hub_services,
    identity_services,
    write_hub_files,
)


def data_services(config: FacilityConfig) -> list[Service]:
    """The servers of the data, in start order (caches after their origins)."""
    return ([data_server(config, region) for region in served_regions(config)]
            + [cache_server(config, region) for region in cached_regions(config)]
            + [store_service(config, region) for region in store_regions(config)])


def _start(supervisor: Supervisor, services: list[Service], report: Callable[[str], None]) -> None:
    for service in services:
        proc, started = supervisor.start(service)
        report(f"{'started' if started else 'already running'}: {service.name} (pid {proc.pid}, "
               f"ports {', '.join(map(str, service.ports))})")


def up(config: FacilityConfig, report: Callable[[str], None] = print, hub: bool = True,
       cluster: bool = True) -> None:
    """Data servers, the facility's Dask cluster (unless ``cluster=False``: a benchmark brings
    its own, and an idle cluster's heartbeats would take their share of the cores it measures)
    and the hub's services (unless ``hub=False``)."""
    supervisor = Supervisor(config.state_path)
    check_prerequisites()
    _start(supervisor, identity_services(config), report)
    prepare_data_access(config)
    _start(supervisor, data_services(config), report)
    for region in store_regions(config):
        upload_region(config, region, report)
    if cluster:
        _start_cluster(config, report)
    if hub:
        write_hub_files(config)
        _start(supervisor, hub_services(config), report)
        report(f"JupyterHub: http://{config.hub.host}:{config.hub.port}  dev logins: "
               + "; ".join(dev_logins(config)))


def _start_cluster(config: FacilityConfig, report: Callable[[str], None]) -> None:
    backend = backend_for(config)
    already = backend.running()
    info = backend.start()
    report(f"{'already running' if already else 'started'}: Dask cluster at "
           f"{info.scheduler_address}, dashboard {info.dashboard_link()}")


def down(config: FacilityConfig, report: Callable[[str], None] = print) -> None:
    supervisor = Supervisor(config.state_path)
    for service in reversed(hub_services(config)):
        if supervisor.stop(service.name):
            report(f"stopped: {service.name}")
    for job in LocalRunner(config).cancel_all("the facility was stopped"):
        report(f"cancelled: job {job.id} of {job.user} ({job.name})")
    for cluster in local_clusters(config):
        if cluster.stop():
            report(f"stopped: Dask cluster {cluster.name}")
    for service in [*reversed(data_services(config)), *identity_services(config)]:
        if supervisor.stop(service.name):
            report(f"stopped: {service.name}")
    remove_outside_admin_folders(config)


def status(config: FacilityConfig) -> list[ServiceState]:
    supervisor = Supervisor(config.state_path)
    services = [*identity_services(config), *data_services(config), *hub_services(config)]
    states = [supervisor.state(service) for service in services]
    clusters = {c.name: c for c in local_clusters(config)}
    default = backend_for(config)
    if isinstance(default, LocalBackend):
        clusters.setdefault(default.name, default)
    states += [supervisor.state(cluster.service()) for cluster in clusters.values()]
    return states
