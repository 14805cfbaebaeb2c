"""``facility.connect()``: a Dask client on a cluster of one's own, from a notebook or a terminal.

    client = facility.connect(max_workers=20)       # new cluster, adaptive 1..20 (within limits)
    client = facility.connect("zpeak", workers=4)   # a named cluster: attach, or create it
    client.cluster.explain()                        # why workers are missing
    client                                          # in a notebook: the client and cluster
                                                    # widget, its dashboard link clickable
    client.cluster.dashboard_link                   # what a browser follows (behind the hub too)
    print(client.cluster.dashboard_url)             # the same, absolute: for a terminal
    client.cluster.close()

The backend comes from the configuration (local processes, or the dask-kubernetes operator).
Requests above the user's limits are clamped with a message naming the limit; attaching checks
that client, scheduler and workers run the same software. Inside a batch job (``facility
submit``) every ``connect()`` attaches to the job's own cluster, sized by the submission.
"""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from collections.abc import Generator
from dataclasses import asdict
from typing import Any

from distributed import Client
from distributed.core import Status
from distributed.security import Security

from facility.cluster.base import ClusterBackend, ClusterError, ClusterInfo, Owner, backend_for
from facility.cluster.display import ClusterView, cluster_html
from facility.cluster.limits import Identity, WorkerRequest, granted_request
from facility.cluster.versions import check_versions
from facility.config import FacilityConfig, load_config
from facility.text import plural


class FacilityCluster:
    """The cluster behind a client: resize it, explain it, close it."""

    def __init__(self, backend: ClusterBackend, info: ClusterInfo) -> None:
        self.backend, self.info = backend, info
        self.client: Client | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def status(self) -> Status:
        """What ``distributed.Client`` asks of a cluster object before connecting to it, and
        when it loses the scheduler (a client of a stopped cluster closes instead of trying
        to reconnect)."""
        return Status.running if self.backend.running() is not None else Status.closed

    def __await__(self) -> Generator[Any, None, FacilityCluster]:
        """``distributed.Client`` awaits its cluster before connecting: it runs already."""
        async def running() -> FacilityCluster:
            return self
        return running().__await__()

    @property
    def scheduler_address(self) -> str:
        return self.info.scheduler_address

    @property
    def security(self) -> Security:
        return self.backend.security

    @property
    def dashboard_link(self) -> str | None:
        """What a browser follows: behind the hub, the notebook server's proxy path."""
        return self.info.dashboard_link()

    @property
    def dashboard_url(self) -> str | None:
        """The dashboard as an absolute address, to print or paste (a terminal, a log)."""
        return self.info.dashboard_url(self.backend.config.hub.address())

    @property
    def notes(self) -> tuple[str, ...]:
        """What the user's limits cut from the request."""
        return self.info.notes

    def _client(self) -> Client:
        if self.client is None:
            raise ClusterError(f"cluster {self.name!r} has no client attached")
        return self.client

    def adapt(self, minimum: int = 1, maximum: int | None = None) -> dict:
        """Let the cluster grow and shrink with the work, within the user's limits."""
        granted = self.backend.granted(minimum, maximum if maximum is not None else minimum)
        return self.backend.adapt(self._client(), granted.min_workers, granted.max_workers)

    def scale(self, n: int) -> dict:
        """A fixed number of workers (stops adapting), within the user's limits."""
        return self.backend.scale(self._client(), self.backend.granted(n, n).max_workers)

    def explain(self) -> str:
        """Why workers are not running (limits, local resources, pending pods and their events)."""
        client = self._client()
        have = len(client.scheduler_info(n_workers=-1)["workers"])
        lines = [f"cluster {self.name!r} ({self.backend.backend_name}): {plural(have, 'worker')} running, "
                 f"asked for {self.backend.request.describe()}"]
        lines += [f"  - {reason}" for reason in self.backend.explain(client)]
        return "\n".join(lines)

    def close(self) -> bool:
        """Stop the cluster's scheduler and workers."""
        if self.client is not None:
            self.client.close()
        return self.backend.stop()

    def _workers(self) -> dict[str, dict[str, Any]] | None:
        """The scheduler's workers, or None when it cannot be asked (no client, stopped)."""
        if self.client is None or self.client.status != "running":
            return None
        try:
            return dict(self.client.scheduler_info(n_workers=-1)["workers"])
        except (OSError, TimeoutError):
            return None

    def view(self) -> ClusterView:
        """What the cluster's widget shows."""
        return ClusterView(self.name, self.backend.backend_name, self.scheduler_address,
                           self.dashboard_link, self.dashboard_url, self._workers(),
                           self.backend.request.describe(), self.notes)

    def _repr_html_(self) -> str:
        """The cluster's widget in a notebook (distributed's Client widget embeds it)."""
        return cluster_html(self.view())

    def __repr__(self) -> str:
        workers = self._workers()
        size = "" if workers is None else f", {plural(len(workers), 'worker')}"
        return (f"<FacilityCluster {self.name!r} {self.backend.backend_name}{size}, "
                f"dashboard {self.dashboard_url or '-'}>")


CLUSTER_NAME_LENGTH = 50  # "<name>-scheduler" must stay a DNS label (63 characters)


def _dns_part(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def cluster_name(who: Identity, name: str | None) -> str:
    """``<user>-<name>``, in the characters Kubernetes object names allow, the user as the hub
    spells them in labels (the admission policy of a shared namespace checks that a cluster's
    name starts so). A long user name is cut, never the cluster's own name: ``alice…-job-7``
    and ``alice…-job-17`` stay apart."""
    from facility.cluster.kubernetes import user_label

    own = _dns_part(name or uuid.uuid4().hex[:6])[:CLUSTER_NAME_LENGTH // 2].strip("-")
    user = user_label(who.user)[:CLUSTER_NAME_LENGTH - len(own) - 1].strip("-")
    return f"{user}-{own}"


def user_backend(config: FacilityConfig, name: str | None, asked: dict[str, Any],
                 idle_timeout: float | None = None) -> ClusterBackend:
    """The backend of the current user's cluster ``name``, sized within their limits and
    owned by this process."""
    who = Identity.current()
    request = granted_request(config, who, **asked)
    return backend_for(config, cluster_name(who, name), request=request,
                       owner=Owner.this_process(), identity=who, idle_timeout=idle_timeout)


JOB_CLUSTER_ENV = "FACILITY_JOB_CLUSTER"


def job_cluster_environment(name: str, request: WorkerRequest) -> dict[str, str]:
    """What a batch job sets so that ``connect()`` in its notebook or script finds its cluster."""
    return {JOB_CLUSTER_ENV: json.dumps({"name": name, "request": asdict(request)})}


def job_cluster(environ: dict[str, str] | None = None) -> tuple[str, WorkerRequest] | None:
    """Inside a batch job: the name and granted request of the job's own cluster."""
    raw = (os.environ if environ is None else environ).get(JOB_CLUSTER_ENV)
    if not raw:
        return None
    record = json.loads(raw)
    return record["name"], WorkerRequest.from_record(record["request"])


def job_backend(config: FacilityConfig, name: str, request: WorkerRequest) -> ClusterBackend:
    """The batch job's cluster: a notebook written interactively (``connect("zpeak",
    workers=4)``) runs unchanged as a job, on the cluster its submission asked for."""
    print(f"facility: batch job: connect() uses the job's cluster {name!r} ({request.describe()})",
          file=sys.stderr)
    return backend_for(config, name, request=request, owner=Owner.this_process(),
                       identity=Identity.current(), idle_timeout=0)


def connect(name: str | None = None, *, workers: int | None = None,
            min_workers: int | None = None, max_workers: int | None = None,
            threads: int | None = None, memory: str | None = None, gpus: int | None = None,
            idle_timeout: float | None = None, wait: bool = True,
            config: FacilityConfig | None = None) -> Client:
    """A client on the user's cluster ``name`` (created if needed, owned by this process); inside
    a batch job, on the job's cluster."""
    config = config or load_config()
    if workers is not None:
        min_workers = max_workers = workers
    in_job = job_cluster()
    backend = job_backend(config, *in_job) if in_job else user_backend(
        config, name, {"min_workers": min_workers, "max_workers": max_workers, "threads": threads,
                       "memory": memory, "gpus": gpus}, idle_timeout)
    handle = FacilityCluster(backend, backend.start())
    try:
        client = Client(handle, security=handle.security, set_as_default=True, timeout=30)
    except OSError as exc:
        raise backend.unreachable(handle.scheduler_address, exc) from exc
    handle.client = client
    try:
        check_versions(client, handle.name)
        if wait and backend.request.min_workers:
            backend.wait_for_workers(client, backend.request.min_workers)
    except OSError as exc:
        client.close()
        raise backend.unreachable(handle.scheduler_address, exc) from exc
    except BaseException:
        client.close()
        raise
    return client
