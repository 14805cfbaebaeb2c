"""The one typed configuration of the facility.

Everything that differs between sites (hosts, ports, paths, regions, limits) lives here and
nowhere else. The same model is read by the command line, the notebook API and the workers; its
JSON schema is what an operator's values are checked against.

Configuration comes from a YAML file (``$FACILITY_CONFIG``, else ``./facility.yaml`` if present,
else the built-in defaults) plus environment overrides of the form
``FACILITY_<SECTION>__<KEY>=value`` (for example ``FACILITY_CLUSTER__MAX_WORKERS=8``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from facility.errors import UsageError
from facility.machine import usable_cores

CONFIG_ENV = "FACILITY_CONFIG"
ENV_PREFIX = "FACILITY_"
DEFAULT_FILE_NAME = "facility.yaml"

Compression = Literal["zstd", "lz4", "zlib", "lzma"]
SampleKind = Literal["drell_yan", "ttbar", "collision_data"]


class ConfigError(UsageError, ValueError):
    """A setting is wrong; the message names the key, the source and what was expected."""


class _Strict(BaseModel):
    """Unknown keys are errors: a typo in a setting must not be silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServeConfig(_Strict):
    """How the embedded facility serves a region's files (a local XRootD server)."""

    xrootd_port: int = Field(ge=1, le=65535, description="root:// port of this region's server")
    http_port: int | None = Field(
        default=None, ge=1, le=65535, description="https:// port (XRootD's HTTP plugin), optional"
    )
    root_dir: Path | None = Field(
        default=None, description="directory served; default <data_dir>/<region name>"
    )


class ObjectStoreConfig(_Strict):
    """A region whose replicas live in a bucket of an S3-compatible object store.

    Replicas are ``s3://<bucket>/<path>``; workers read them through s3fs with the credentials
    of the user's environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``), which the
    facility never writes into a catalog, a log or a pod spec.
    """

    bucket: str = Field(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
    endpoint_url: str | None = Field(
        default=None, pattern=r"^https?://",
        description="the store's S3 endpoint; default: the embedded server (http://host:port)")
    port: int | None = Field(
        default=None, ge=1, le=65535,
        description="the embedded facility runs an S3-compatible server on this port and "
                    "uploads the region's files into the bucket")


class CacheConfig(_Strict):
    """An XCache (XRootD proxy with its file cache) in front of a region's server.

    Reads of the region go through the cache first: a block read once is served from the
    cache's disk afterwards, even while the region's server is down.
    """

    xrootd_port: int = Field(ge=1, le=65535, description="root:// port of the cache")
    host: str = Field(default="localhost", description="host name of the cache")
    ram: str = Field(default="1g", pattern=r"^\d+[kmg]$",
                     description="memory for blocks in flight (XrdPfc's pfc.ram, at least 1g)")
    block_size: str = Field(default="1m", pattern=r"^\d+[kmg]$",
                            description="unit of caching (pfc.blocksize)")
    prefetch: int = Field(default=0, ge=0, le=64,
                          description="blocks read ahead per open file (pfc.prefetch); 0 fetches "
                                      "only what is read: an analysis reads a few branches of a "
                                      "file, and read-ahead would pull the whole file")
    cache_dir: Path | None = Field(default=None,
                                   description="where cached files live; default <state>/xcache/<region>")


class RegionConfig(_Strict):
    """A storage region: where replicas live and how far it is from the compute."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    distance: int = Field(default=0, ge=0, description="lower is nearer; nearest is read first")
    host: str = Field(default="localhost", description="host name of the region's data server")
    serve: ServeConfig | None = Field(
        default=None, description="set to run this region's server in the embedded facility"
    )
    object_store: ObjectStoreConfig | None = Field(
        default=None, description="the region is a bucket of an S3-compatible store")
    cache: CacheConfig | None = Field(
        default=None, description="read the region through an XCache (embedded: started by `up`)")

    @model_validator(mode="after")
    def _one_kind_of_storage(self) -> RegionConfig:
        if self.cache and not self.serve:
            raise ValueError(f"region {self.name!r}: a cache needs the region's own server "
                             "(`serve`) as its origin")
        if self.serve and self.object_store:
            raise ValueError(f"region {self.name!r}: either `serve` (XRootD) or `object_store` "
                             "(S3), not both")
        store = self.object_store
        if store and not store.endpoint_url and not store.port:
            raise ValueError(f"region {self.name!r}: object_store needs an endpoint_url, or a "
                             "port for the embedded server")
        return self

    def s3_endpoint(self) -> str | None:
        store = self.object_store
        if store is None:
            return None
        return store.endpoint_url or f"http://{self.host}:{store.port}"


MEMORY_PATTERN = r"^\d+(\.\d+)?\s*(B|KiB|MiB|GiB|TiB|KB|MB|GB|TB)$"
# glibc refuses a larger mmap threshold (half its 64 MiB heap size on 64-bit machines)
MAX_MMAP_THRESHOLD = 32 * 2**20


class Limits(_Strict):
    """What one cluster of a user may hold at once; null is no limit."""

    workers: int | None = Field(default=None, ge=0)
    cores: int | None = Field(default=None, ge=0)
    memory: str | None = Field(default=None, pattern=MEMORY_PATTERN)
    gpus: int | None = Field(default=None, ge=0)


class LimitsConfig(_Strict):
    """Limits by user, then by VO group (the most generous group wins), then the default."""

    default: Limits = Field(default_factory=Limits)
    groups: dict[str, Limits] = Field(default_factory=dict)
    users: dict[str, Limits] = Field(default_factory=dict)


class KubernetesConfig(_Strict):
    """How the kubernetes backend shapes the DaskCluster it asks the dask operator for."""

    operator: bool = Field(default=False, description="the dask-kubernetes operator is installed")
    namespace: str = Field(default="default", pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                           description="where clusters run when users share a namespace")
    user_namespace_template: str | None = Field(
        default=None, pattern=r"^[a-z0-9-]*\{username\}[a-z0-9-]*$",
        description="e.g. facility-{username}: each user's server and clusters run in a namespace "
                    "of their own (quota, limit range, network isolation); null: all share "
                    "`namespace`")
    image: str | None = Field(default=None,
                              description="worker image; default: the notebook's JUPYTER_IMAGE_SPEC")
    scheduler_service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    forward_env: list[str] = Field(
        default_factory=lambda: ["FACILITY_*", "X509_*", "BEARER_TOKEN*", "JUPYTERHUB_USER",
                                 "AWS_*"],
        description="environment variables (fnmatch patterns) copied from the notebook to pods")
    secret_env: list[str] = Field(
        default_factory=lambda: ["*TOKEN", "*SECRET", "*PASSWORD", "*SECRET_ACCESS_KEY"],
        description="forwarded variables (fnmatch patterns) whose values are secrets: they reach "
                    "the pods through a Secret, never as plain values in a pod spec")
    gpu_node_selector: dict[str, str] = Field(default_factory=dict)
    gpu_tolerations: list[dict[str, str]] = Field(default_factory=list)
    scheduler_priority_class: str | None = Field(
        default=None, description="PriorityClass of schedulers (the chart creates it): a scheduler "
                                  "holds a whole analysis and must not be preempted")
    worker_priority_class: str | None = Field(
        default=None, description="PriorityClass of workers (the chart creates it): workers are "
                                  "cheap to lose, Dask reruns their tasks")
    scheduler_node_selector: dict[str, str] = Field(
        default_factory=dict, description="keeps schedulers on regular (not spot) nodes")
    worker_node_selector: dict[str, str] = Field(
        default_factory=dict, description="e.g. a spot / preemptible node pool for workers")
    worker_tolerations: list[dict[str, str]] = Field(
        default_factory=list, description="tolerations for the workers' (spot) node pool taints")


class ClusterConfig(_Strict):
    """The Dask clusters runs and notebooks use."""

    backend: Literal["auto", "local", "kubernetes"] = Field(
        default="auto", description="auto: kubernetes inside a pod where the operator is installed")
    min_workers: int = Field(default=1, ge=0)
    max_workers: int = Field(default_factory=usable_cores, ge=1)
    threads_per_worker: int = Field(default=1, ge=1)
    memory_limit: str = Field(default="4GiB", pattern=MEMORY_PATTERN)
    gpus_per_worker: int = Field(default=0, ge=0)
    scheduler_port: int = Field(default=0, ge=0, le=65535, description="0 picks a free port")
    dashboard_port: int = Field(default=8787, ge=0, le=65535, description="0 picks a free port")
    worker_start_timeout: float = Field(default=120.0, gt=0)
    idle_timeout: float = Field(
        default=1800.0, ge=0,
        description="seconds without work before a cluster stops, counted from the last task, "
        "worker joining or client coming or going; 0 never")
    malloc_trim_threshold: int | None = Field(
        default=128 * 2**20, ge=0,
        description="bytes of freed memory a worker process keeps for its next chunk "
                    "(MALLOC_TRIM_THRESHOLD_); Dask's own 65536 hands every freed array back to the "
                    "OS, and each chunk then pays a page fault for every page it touches again. "
                    "Both thresholds null: glibc's adaptive ones (see benchmarks)")
    malloc_mmap_threshold: int | None = Field(
        default=16 * 2**20, ge=0, le=MAX_MMAP_THRESHOLD,
        description="bytes above which an array gets pages of its own, handed back when it is "
                    "freed (MALLOC_MMAP_THRESHOLD_); smaller ones reuse the memory kept. glibc "
                    "ignores a value above 32 MiB")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    kubernetes: KubernetesConfig = Field(default_factory=KubernetesConfig)

    @model_validator(mode="after")
    def _min_not_above_max(self) -> ClusterConfig:
        if self.min_workers > self.max_workers:
            raise ValueError(
                f"min_workers ({self.min_workers}) is above max_workers ({self.max_workers})"
            )
        return self


class ProcessingConfig(_Strict):
    """How a dataset is cut into chunks, how failures are handled, how a run is kept."""

    chunk_size: int = Field(default=250_000, ge=1,
                            description="target events per chunk; chunks are whole ROOT clusters, "
                                        "so a file's chunk is never smaller than its clusters")
    retries: int = Field(default=2, ge=0,
                         description="further tries of a chunk or preflight whose servers were "
                                     "unavailable, or whose replicas all looked damaged (a "
                                     "second worker confirms damage before a file is called bad)")
    on_bad_input: Literal["fail", "skip"] = Field(
        default="fail", description="fail: stop naming the file; skip: finish and report it "
                                    "(only damaged or missing data is ever skipped)"
    )
    max_skipped_fraction: float = Field(
        default=0.05, ge=0.0, le=1.0,
        description="with on_bad_input=skip: the run fails when more than this fraction of its "
                    "events had to be skipped")
    checkpoint_seconds: float = Field(
        default=1.0, gt=0,
        description="how often a run makes its merged result durable in its folder (what a "
                    "resume after a crash need not process again); never more than a tenth of "
                    "the run's time")
    max_tasks_per_second: float = Field(
        default=100.0, gt=0,
        description="the task rate a run keeps its scheduler under: chunks are bundled, several "
                    "to a task, once slots / chunk time exceeds it (a Dask scheduler starts a few "
                    "thousand tasks a second at best)")
    bundle_limit: int = Field(default=64, ge=1, description="chunks one task processes at most")
    blackhole_failures: int = Field(
        default=3, ge=1,
        description="a worker on which this many tries failed, none succeeded, while other "
                    "workers succeed, is retired from the run (broken disk or network)")
    open_timeout: int = Field(default=30, ge=1, description="seconds to open a remote file")
    open_files_per_worker: int = Field(default=16, ge=1, description="open-file cache per worker")


class BatchKubernetesConfig(_Strict):
    """The pod of a batch job on Kubernetes (a DaskJob of the dask operator); its Dask cluster is
    shaped like any cluster of ``cluster.kubernetes``."""

    image: str | None = Field(default=None, description="job image; default: cluster.kubernetes.image, "
                                                        "else the notebook's JUPYTER_IMAGE_SPEC")
    service_account: str | None = Field(default=None,
                                        description="service account of the job pod, "
                                                    "{username}: the user's; null: the namespace's "
                                                    "default")
    cpu: float = Field(default=1.0, gt=0, description="cores of the job pod (the notebook's kernel)")
    memory: str = Field(default="4GiB", pattern=MEMORY_PATTERN, description="memory of the job pod")
    volumes: list[dict[str, Any]] = Field(
        default_factory=list, description="pod volumes of the job pod, e.g. the user's home claim "
                                          "(claim-{username}) that holds the job store and the "
                                          "output area; required")
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list,
                                                description="where the job container mounts them")
    start_timeout: float = Field(default=900.0, gt=0,
                                 description="seconds a job pod may stay pending (waiting for a "
                                             "node) before the job is failed")


class BatchConfig(_Strict):
    """Batch jobs: notebooks and scripts that run unattended with a Dask cluster of their own."""

    runner: Literal["auto", "local", "kubernetes"] = Field(
        default="auto", description="auto: kubernetes where the cluster backend is kubernetes, "
                                    "else local (detached processes on this machine)")
    max_running_per_user: int = Field(default=2, ge=1,
                                      description="jobs of one user running at once; the others "
                                                  "wait in the queue")
    workers: int = Field(default=2, ge=0, description="workers of a job's own Dask cluster when the "
                                                      "submission does not say; 0: no cluster")
    kernel: str | None = Field(default=None,
                               description="kernel of notebook jobs; null: the notebook's own")
    cell_timeout: float | None = Field(default=None, gt=0,
                                       description="seconds one notebook cell may run; null: no limit")
    kubernetes: BatchKubernetesConfig = Field(default_factory=BatchKubernetesConfig)


def _only_unique(names: list[str], items: list[Any]) -> list[Any]:
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"names must be unique, repeated: {', '.join(duplicated)}")
    return items


class VOConfig(_Strict):
    """The virtual organisation's identity provider and what its tokens say about a user."""

    name: str = Field(default="your VO", description="shown on the login button")
    issuer: str | None = Field(
        default=None, description="OpenID issuer URL; null: the embedded provider of this machine")
    client_id: str = "facility-hub"
    client_secret_env: str = Field(default="FACILITY_HUB_CLIENT_SECRET",
                                   description="environment variable holding the client secret")
    scopes: list[str] = Field(default_factory=lambda: ["openid", "profile", "email", "storage.read:/",
                                                       "offline_access", "wlcg.groups"])
    authorize_url: str | None = Field(default=None, description="null: from the issuer's discovery")
    token_url: str | None = Field(default=None, description="null: from the issuer's discovery")
    userinfo_url: str | None = Field(default=None, description="null: from the issuer's discovery")
    end_session_url: str | None = Field(
        default=None,
        description="the provider's end_session_endpoint, where the hub's logout ends the "
                    "provider's session too; null: from the issuer's discovery when the hub reads "
                    "it (set it beside explicit endpoints); a provider without one: logout ends "
                    "the hub's session only")
    claims_from: Literal["id_token", "userinfo"] = Field(
        default="id_token",
        description="where the user's name and groups are read: the ID token, or the userinfo "
                    "endpoint (which refuses access tokens issued for the data servers)")
    username_claim: str = "preferred_username"
    group_claims: list[str] = Field(
        default_factory=lambda: ["wlcg.groups", "eduperson_entitlement", "groups"],
        description="claims read for VO group membership, in this order")
    allowed_groups: list[str] = Field(default_factory=list,
                                      description="members of any of these may log in")
    admin_groups: list[str] = Field(default_factory=list)


class ProfileConfig(_Strict):
    """A user environment offered at spawn time; ``groups`` limits who sees it."""

    slug: str = Field(pattern=r"^[a-z0-9-]+$")
    display_name: str
    description: str = Field(default="", description="what the profile is for, shown under its "
                                                     "name on the profile page")
    cpu: float = Field(default=2.0, gt=0)
    memory: str = Field(default="8GiB", pattern=MEMORY_PATTERN)
    gpus: int = Field(default=0, ge=0)
    image: str | None = Field(default=None, description="notebook image; null: the hub's default")
    groups: list[str] = Field(default_factory=list, description="empty: every allowed user")
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, str]] = Field(default_factory=list)
    default: bool = False


class DevUser(_Strict):
    """A login of the embedded identity provider (for trying and testing the facility)."""

    username: str = Field(pattern=r"^[a-z][a-z0-9._-]*$")
    password: str
    groups: list[str] = Field(default_factory=list)
    email: str | None = None


def _default_profiles() -> list[ProfileConfig]:
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    return [
        ProfileConfig(slug="cpu-small", display_name="CPU, small",
                      description="For most analyses: notebooks, plots and a Dask cluster of "
                                  "your own, whose workers do the heavy lifting.",
                      cpu=2, memory="8GiB", default=True),
        ProfileConfig(slug="cpu-large", display_name="CPU, large",
                      description="For work inside the notebook itself: large histograms or "
                                  "arrays in memory, local fits, many files read at once.",
                      cpu=8, memory="32GiB"),
        ProfileConfig(slug="gpu", display_name="GPU",
                      description="An NVIDIA GPU with CUDA libraries, for machine learning and "
                                  "GPU-accelerated array code.", cpu=4,
                      memory="32GiB", gpus=1, groups=["cms/gpu"],
                      node_selector={"nvidia.com/gpu.present": "true"}, tolerations=[gpu_toleration]),
    ]


def _default_dev_users() -> list[DevUser]:
    return [DevUser(username="alice", password="alice-dev", groups=["cms", "cms/gpu"]),
            DevUser(username="bob", password="bob-dev", groups=["cms"]),
            DevUser(username="eve", password="eve-dev", groups=["other-vo"])]


class HubConfig(_Strict):
    """JupyterHub: where it listens, whom it lets in, what it offers."""

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535, description="public port (the proxy)")
    public_url: str | None = Field(
        default=None, pattern=r"^https?://[^/]+$",
        description="the address users open (behind ingress / load balancer); null: http://host:port")
    server_home: str = Field(
        default="/home/jovyan", pattern=r"^/",
        description="home folder of user servers on Kubernetes (the user image's HOME); their "
                    "token file is kept under it")
    hub_port: int = Field(default=8081, ge=1, le=65535)
    proxy_api_port: int = Field(default=8001, ge=1, le=65535)
    provider_port: int = Field(default=5556, ge=1, le=65535,
                               description="port of the embedded identity provider")
    vo: VOConfig = Field(default_factory=lambda: VOConfig(allowed_groups=["cms"],
                                                          admin_groups=["cms/admin"]))
    profiles: list[ProfileConfig] = Field(default_factory=_default_profiles, min_length=1)
    dev_users: list[DevUser] = Field(default_factory=_default_dev_users)
    idle_culler_timeout: int = Field(default=3600, ge=60, description="seconds before an idle "
                                     "user server is stopped")
    token_poll_seconds: float = Field(default=60.0, gt=0,
                                      description="how often a user server fetches its token")
    notebooks_dir: Path | None = Field(
        default=None, description="notebooks copied into a new user's home: on this machine "
                                  "(local spawner), or in the user image (Kubernetes)")
    first_notebook: str | None = Field(
        default="quickstart.ipynb", pattern=r"^[^/].*\.ipynb$",
        description="the notebook (in the home) a user's first server opens instead of the "
                    "Launcher; null: the Launcher")
    user_output_dir: str | None = Field(
        default="facility-output", pattern=r"^[^/~]",
        description="users' run and job outputs go to this folder of their server's home, "
                    "where the file browser shows them; null: output_dir")
    access_token_seconds: int = Field(default=900, ge=60,
                                      description="access token lifetime (embedded provider)")
    token_refresh_seconds: int = Field(default=300, ge=30,
                                       description="refresh the user's tokens this long before "
                                                   "they expire")
    support_contact: str | None = Field(
        default=None,
        description="whom users refused by the hub ask for access: an e-mail address, a web "
                    "address or words, shown on the refusal page; null: their VO's administrators")

    @field_validator("profiles", "dev_users")
    @classmethod
    def _unique(cls, items: list[Any]) -> list[Any]:
        """Profiles are picked by slug and users log in by name: each may appear once."""
        return _only_unique([getattr(i, "slug", None) or i.username for i in items],
                            items)

    def address(self) -> str:
        """The address users open (``public_url``, else the embedded proxy's)."""
        return self.public_url or f"http://{self.host}:{self.port}"


class SampleConfig(_Strict):
    """A synthetic dataset that ``facility data generate`` writes."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    kind: SampleKind
    files: int = Field(default=2, ge=1)
    events_per_file: int = Field(default=50_000, ge=1)
    cluster_events: int = Field(default=10_000, ge=1,
                                description="entries per ROOT cluster (basket group): the finest "
                                            "chunking a run of these files can have")
    seed: int = 1
    compression: Compression = "zstd"
    cross_section_pb: float | None = Field(default=None, gt=0)


def _default_regions() -> list[RegionConfig]:
    return [
        RegionConfig(name="east", distance=0, serve=ServeConfig(xrootd_port=11094, http_port=18094)),
        RegionConfig(name="west", distance=10, serve=ServeConfig(xrootd_port=11095, http_port=18095),
                     cache=CacheConfig(xrootd_port=11096)),
    ]


def _default_samples() -> list[SampleConfig]:
    return [
        SampleConfig(name="DYJetsToMuMu", kind="drell_yan", files=4, events_per_file=100_000,
                     seed=11, cross_section_pb=2025.0),
        SampleConfig(name="TTToSemiLeptonic", kind="ttbar", files=2, events_per_file=50_000,
                     seed=22, cross_section_pb=365.3),
        SampleConfig(name="SingleMuon", kind="collision_data", files=2, events_per_file=50_000,
                     seed=33),
    ]


class DataAccessConfig(_Strict):
    """Who may read the data servers: VO tokens in the WLCG profile, over TLS only.

    The embedded servers export read-only and accept a read only with a token issued by the
    VO's provider (``hub.vo.issuer``, else the embedded one) or one of ``issuers``, meant for
    ``audience`` and granting ``scope``. The facility's own client gets such tokens from the
    embedded provider for reads from a terminal.
    """

    require_token: bool = Field(default=True,
                                description="the embedded servers refuse reads without a token")
    issuers: list[str] = Field(default_factory=list,
                               description="further token issuers the servers trust")
    audience: str = Field(default="https://wlcg.cern.ch/jwt/v1/any",
                          description="the audience data tokens are for")
    scope: str = Field(default="storage.read:/", description="the scope a read needs")
    local_client_id: str = Field(
        default="facility-local",
        description="the embedded provider's client for tokens of terminal sessions")
    local_token_seconds: int = Field(default=43200, ge=600,
                                     description="lifetime of those tokens")


class FacilityConfig(_Strict):
    """Top-level configuration. Relative paths are resolved against ``home``."""

    home: Path = Field(default=Path(".facility"), description="base of all facility state")
    state_dir: Path = Field(default=Path("state"), description="pid files, logs, runtime files")
    data_dir: Path = Field(default=Path("data"), description="files served by embedded regions")
    output_dir: Path = Field(default=Path("output"), description="users' run outputs")
    catalog: Path = Field(default=Path("catalog.yaml"), description="dataset catalog (YAML)")
    regions: list[RegionConfig] = Field(default_factory=_default_regions, min_length=1)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    processing: ProcessingConfig = Field(default_factory=ProcessingConfig)
    hub: HubConfig = Field(default_factory=HubConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    samples: list[SampleConfig] = Field(default_factory=_default_samples)
    data_access: DataAccessConfig = Field(default_factory=DataAccessConfig)

    @field_validator("regions", "samples")
    @classmethod
    def _unique_names(cls, items: list[Any]) -> list[Any]:
        """Regions and samples are looked up by name, so a name may appear only once."""
        return _only_unique([item.name for item in items], items)

    @field_validator("regions")
    @classmethod
    def _one_object_store(cls, regions: list[RegionConfig]) -> list[RegionConfig]:
        """Workers read s3:// through one endpoint (their AWS_ENDPOINT_URL_S3)."""
        endpoints = {r.s3_endpoint() for r in regions if r.object_store}
        if len(endpoints) > 1:
            raise ValueError(f"regions use {len(endpoints)} object-store endpoints; the workers "
                             "read s3:// through one")
        return regions

    def s3_endpoint(self) -> str | None:
        """The object-store endpoint s3:// replicas are read from, if a region has one."""
        return next((r.s3_endpoint() for r in self.regions if r.object_store), None)

    def path(self, value: Path) -> Path:
        """Resolve a configured path: absolute stays, relative hangs off ``home``."""
        return value if value.is_absolute() else (self.home / value).resolve()

    @property
    def state_path(self) -> Path:
        return self.path(self.state_dir)

    @property
    def data_path(self) -> Path:
        return self.path(self.data_dir)

    @property
    def output_path(self) -> Path:
        return self.path(self.output_dir)

    @property
    def catalog_path(self) -> Path:
        return self.path(self.catalog)

    def region(self, name: str) -> RegionConfig:
        for region in self.regions:
            if region.name == name:
                return region
        known = ", ".join(r.name for r in self.regions)
        raise ConfigError(f"unknown region {name!r}; configured regions: {known}")

    def region_root(self, region: RegionConfig) -> Path:
        """Directory holding a served region's files."""
        if region.serve and region.serve.root_dir:
            return self.path(region.serve.root_dir)
        return self.data_path / region.name

    def sample(self, name: str) -> SampleConfig:
        for sample in self.samples:
            if sample.name == name:
                return sample
        known = ", ".join(s.name for s in self.samples)
        raise ConfigError(f"unknown sample {name!r}; configured samples: {known}")


# ---------------------------------------------------------------------------------------------
# loading


def _env_overrides(environ: dict[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """Nested settings from ``FACILITY_A__B=value``; values parse as YAML scalars.

    Other ``FACILITY_`` variables (``FACILITY_GROUPS``, tokens, secrets) belong to the parts that
    set them, not to the configuration: only ``SECTION__KEY`` names and top-level settings count.
    """
    overrides: dict[str, Any] = {}
    sources: dict[tuple[str, ...], str] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == CONFIG_ENV:
            continue
        rest = name[len(ENV_PREFIX):]
        if "__" not in rest and rest.lower() not in FacilityConfig.model_fields:
            continue
        keys = tuple(part.lower() for part in rest.split("__"))
        if not all(keys):
            continue
        target = overrides
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = yaml.safe_load(raw) if raw != "" else ""
        sources[keys] = name
    return overrides, sources


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _describe(error: Any, file: Path | None, env_sources: dict[tuple[str, ...], str]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    key = ".".join(loc) or "(top level)"
    source = env_sources.get(loc) or (str(file) if file else "defaults")
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        message = "unknown setting (check the spelling)"
    got = error.get("input")
    shown = "" if error["type"] in ("missing", "extra_forbidden") or isinstance(got, dict) else f" (got {got!r})"
    return f"  {key}: {message}{shown} [from {source}]"


def _read_yaml(file: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except FileNotFoundError as exc:
        raise ConfigError(f"configuration file {file} does not exist") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {file} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"configuration file {file} must hold a mapping of settings")
    return data


def config_file(environ: dict[str, str] | None = None) -> Path | None:
    """Which file configures this process, if any."""
    environ = dict(os.environ) if environ is None else environ
    if environ.get(CONFIG_ENV):
        return Path(environ[CONFIG_ENV]).expanduser()
    local = Path.cwd() / DEFAULT_FILE_NAME
    return local if local.exists() else None


def load_config(file: Path | str | None = None, environ: dict[str, str] | None = None) -> FacilityConfig:
    """Load and validate the configuration; relative ``home`` resolves against the file's folder."""
    environ = dict(os.environ) if environ is None else environ
    path = Path(file) if file is not None else config_file(environ)
    data = _read_yaml(path) if path else {}
    overrides, env_sources = _env_overrides(environ)
    try:
        config = FacilityConfig.model_validate(_merge(data, overrides))
    except ValidationError as exc:
        lines = [_describe(err, path, env_sources) for err in exc.errors()]
        raise ConfigError("invalid facility configuration:\n" + "\n".join(lines)) from None
    base = path.resolve().parent if path else Path.cwd()
    config.home = (base / config.home.expanduser()).resolve()
    return config


def config_json_schema() -> dict[str, Any]:
    """The JSON schema of the configuration (the chart's ``facility:`` values use it)."""
    return FacilityConfig.model_json_schema()
