"""The job runner interface: submit, queue, start, reap and cancel batch jobs of one facility.

What every runner shares lives here: checking a submission, the per-user queue in the job store,
who may see which job. A runner implementation knows only how to start a claimed job, tell how
it ended, stop it, and give the job its Dask cluster: ``local`` (a detached process on this
machine, :mod:`facility.batch.local`) or ``kubernetes`` (a DaskJob of the dask operator,
:mod:`facility.batch.kubernetes`). The configuration picks one (``batch.runner``).

A queued job starts as soon as a slot of its user's limit (``batch.max_running_per_user``) is
free, whoever frees it: the submission itself, a job ending (its last act is to start the next
job of its user), a cancellation, or any look at the jobs that finds a job that died unseen.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from facility.batch.inputs import JobInput, job_input
from facility.batch.model import (
    Job,
    JobAccessError,
    JobError,
    JobInputError,
    JobState,
    job_cluster_name,
)
from facility.batch.store import JobStore, batch_path
from facility.cluster.base import ClusterBackend, Owner, backend_for, backend_name
from facility.cluster.limits import Identity, WorkerRequest, granted_request
from facility.config import CONFIG_ENV, FacilityConfig

# A job's own process records its handle within moments of being started; a running job without
# one after this long was lost between the claim and the start (its starter died).
START_GRACE_SECONDS = 120.0
# notebook parameters that name catalog datasets, checked at submit
DATASET_PARAMETERS = {"dataset", "datasets"}
# Variables of the submitting notebook kernel that must not leak into a job: the kernel's own
# plumbing, its inline plot backend, the server's API token (revoked when the server stops) and
# a surrounding job's cluster (a job submitted from a job gets its own).
DROPPED_ENV_PREFIXES = ("JPY_", "FACILITY_JOB_")
DROPPED_ENV = ("JUPYTERHUB_API_TOKEN", "MPLBACKEND", CONFIG_ENV)


def private_folder(config: FacilityConfig, job_id: int) -> Path:
    """A job's inputs: the snapshot of its notebook or script, its environment, its config."""
    return batch_path(config) / "jobs" / str(job_id)


def output_folder(config: FacilityConfig, user: str, job_id: int) -> Path:
    return config.output_path / user / "jobs" / str(job_id)


def job_environment(environ: dict[str, str], config_file: Path) -> dict[str, str]:
    """The submitter's environment (credentials, VO groups, user) as the job will have it."""
    env = {key: value for key, value in environ.items()
           if key not in DROPPED_ENV and not key.startswith(DROPPED_ENV_PREFIXES)}
    env[CONFIG_ENV] = str(config_file)
    return env


def write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)


def runner_name(config: FacilityConfig) -> str:
    """``auto`` follows the cluster backend: jobs run where the clusters run."""
    chosen = config.batch.runner
    return backend_name(config) if chosen == "auto" else chosen


def runner_for(config: FacilityConfig) -> JobRunner:
    """The runner the configuration selects."""
    from facility.batch.kubernetes import KubernetesRunner
    from facility.batch.local import LocalRunner

    runners: dict[str, type[JobRunner]] = {LocalRunner.runner_name: LocalRunner,
                                           KubernetesRunner.runner_name: KubernetesRunner}
    return runners[runner_name(config)](config)


class JobRunner(ABC):
    """Batch jobs of one facility: a store of records and a way to run them."""

    runner_name = "abstract"

    def __init__(self, config: FacilityConfig) -> None:
        self.config = config
        self.store = JobStore.for_config(config)

    # -- what an implementation provides --------------------------------------------------------

    @abstractmethod
    def launch(self, job: Job) -> dict[str, Any]:
        """Start a job the store has just marked running; returns its handle (how to find it)."""

    @abstractmethod
    def ended(self, job: Job) -> tuple[JobState, str | None] | None:
        """None while a running job's process lives; else the state and reason it ended with,
        for a job that could not record them itself (killed, lost with its machine)."""

    @abstractmethod
    def kill(self, job: Job) -> None:
        """Stop a running job: its process and everything it started, its Dask cluster too."""

    @abstractmethod
    def cluster(self, job: Job) -> AbstractContextManager[ClusterBackend | None]:
        """Inside the job: its Dask cluster (None if it asked for none), up while the job runs."""

    def check_setup(self) -> None:  # noqa: B027 (most runners need nothing more)
        """Refuse a submission this runner could never run, naming the setting to change."""

    def own_handle(self) -> dict[str, Any] | None:
        """Inside the job: the handle it records for itself (None: its starter records it)."""
        return None

    def logs(self, job: Job) -> str:
        """What the job wrote: its log, ending with the failing cell and traceback, if any."""
        try:
            return job.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(job {job.id} has written no log yet: it is {job.state})\n"

    # -- submission ----------------------------------------------------------------------------

    def submit(self, path: str | Path, parameters: dict[str, Any] | None = None,
               args: list[str] | None = None, *, name: str | None = None,
               asked: dict[str, Any] | None = None,
               environ: dict[str, str] | None = None) -> Job:
        """Check, record and (if the user has a free slot) start a job."""
        env = dict(os.environ if environ is None else environ)
        who = Identity.current(env)
        self.check_setup()
        checked = job_input(path, parameters, args, self.config.batch.kernel)
        self.check_datasets(checked.parameters)
        request = self.job_request(who, asked or {})
        self.reap(who.user)
        with self.store.adding(who.user, checked.kind, str(checked.path), checked.parameters,
                               checked.args, request, self.runner_name, name or checked.path.name,
                               lambda job_id: output_folder(self.config, who.user, job_id)) as job_id:
            self._prepare(job_id, checked, env)
        self.start_queued(who.user)
        return self.own(job_id, who)

    def check_datasets(self, parameters: dict[str, Any]) -> None:
        """A notebook's ``dataset`` or ``datasets`` parameter names catalog datasets: an unknown
        one is refused now, not when the job has started."""
        from facility.data.catalog import CatalogError, load_catalog

        for key in DATASET_PARAMETERS & set(parameters):
            value = parameters[key]
            names = [value] if isinstance(value, str) else list(value or [])
            catalog = load_catalog(self.config.catalog_path)
            for name in names:
                try:
                    catalog.get(str(name))
                except CatalogError as unknown:
                    raise JobInputError(f"parameter {key}: {unknown}") from None

    def job_request(self, who: Identity, asked: dict[str, Any]) -> WorkerRequest | None:
        """The job's cluster within the user's limits; None for a job without a cluster."""
        asked = {key: value for key, value in asked.items() if value is not None}
        workers = asked.pop("workers", None)
        if workers is None and "min_workers" not in asked and "max_workers" not in asked:
            workers = self.config.batch.workers
        if workers == 0 or asked.get("max_workers") == 0:
            return None
        if workers is not None:
            asked["min_workers"] = asked["max_workers"] = workers
        return granted_request(self.config, who, **asked)

    def _prepare(self, job_id: int, checked: JobInput, environ: dict[str, str]) -> None:
        """The job's private inputs, written before its record is committed."""
        folder = private_folder(self.config, job_id)
        shutil.rmtree(folder, ignore_errors=True)  # left by a submission that was rolled back
        (folder / "input").mkdir(parents=True)
        folder.chmod(0o700)
        shutil.copy2(checked.path, folder / "input" / checked.path.name)
        config_file = folder / "facility.yaml"
        write_private(config_file, self.config.model_dump_json(indent=1))  # JSON is YAML
        write_private(folder / "env.json", json.dumps(job_environment(environ, config_file)))

    def inputs(self, job: Job) -> tuple[Path, dict[str, str]]:
        """The snapshot of the job's notebook or script, and the environment it runs with."""
        folder = private_folder(self.config, job.id)
        return (folder / "input" / Path(job.path).name,
                json.loads((folder / "env.json").read_text()))

    # -- the queue -----------------------------------------------------------------------------

    def start_queued(self, user: str) -> list[Job]:
        """Start the user's oldest queued jobs while they have free slots."""
        started = []
        while (job := self.store.claim_next(user, self.config.batch.max_running_per_user)):
            try:
                handle = self.launch(job)
            except Exception as exc:  # noqa: BLE001 (any launch failure fails this job, not the queue)
                self.store.finish(job.id, "failed", error=f"the job could not be started: "
                                                          f"{type(exc).__name__}: {exc}")
                continue
            if not self.store.set_handle(job.id, handle):  # cancelled while it was starting
                self.kill(dataclasses.replace(job, handle=handle))
                continue
            started.append(job)
        return started

    def reap(self, user: str) -> None:
        """Record jobs that ended without saying so (killed, lost), then refill the user's slots."""
        for job in self.store.jobs(user, ("running",)):
            if not job.handle:
                if time.time() - (job.started or 0) > START_GRACE_SECONDS:
                    self.store.finish(job.id, "failed", error="the job was never started")
                continue
            outcome = self.ended(job)
            if outcome is not None:
                state, reason = outcome
                self.store.finish(job.id, state, 0 if state == "succeeded" else None, reason)
        self.start_queued(user)

    # -- a user's view -------------------------------------------------------------------------

    def own(self, job_id: int, who: Identity | None = None) -> Job:
        """The job, if it is one of the user's: users see and cancel only their own jobs."""
        who = who or Identity.current()
        job = self.store.get(int(job_id))
        if job is None:
            raise JobAccessError(f"no job {job_id}; `facility jobs list` shows the jobs of user "
                                 f"{who.user!r}")
        if job.user != who.user:
            raise JobAccessError(f"job {job_id} belongs to user {job.user!r}, not to {who.user!r}: "
                                 "users see, cancel and read the logs of their own jobs only")
        return job

    def status(self, job_id: int, who: Identity | None = None) -> Job:
        """The job, its state brought up to date."""
        job = self.own(job_id, who)
        if job.active:
            self.reap(job.user)
            job = self.own(job_id, who)
        return job

    def jobs(self, who: Identity | None = None) -> list[Job]:
        """The user's jobs, states brought up to date."""
        who = who or Identity.current()
        self.reap(who.user)
        return self.store.jobs(who.user)

    def cancel(self, job_id: int, who: Identity | None = None) -> tuple[Job, JobState]:
        """Cancel a queued or running job: its process tree and its cluster stop, the next
        queued job of the user starts. Returns the job and the state it had."""
        who = who or Identity.current()
        job = self.own(job_id, who)
        before = self._cancel(job, f"cancelled by {who.user}")
        self.start_queued(job.user)
        return self.own(job_id, who), before or job.state

    def cancel_all(self, reason: str) -> list[Job]:
        """Cancel every user's queued and running jobs (the facility itself is stopping). The
        queued ones go first: a stopped job's last act is to start its user's next one."""
        active = self.store.jobs(None, ("queued",)) + self.store.jobs(None, ("running",))
        cancelled = []
        for job in active:
            if self._cancel(job, reason) is not None:
                cancelled.append(job)
        return cancelled

    def _cancel(self, job: Job, reason: str) -> JobState | None:
        """Record the cancellation, then stop the job as it is found after it: a job starting
        meanwhile has recorded its handle by then, or will find itself cancelled and not run."""
        before = self.store.cancel(job.id, reason)
        if before == "running":
            self.kill(self.store.get(job.id) or job)
        return before

    def cluster_backend(self, job: Job, owner: Owner | None = None) -> ClusterBackend:
        """The backend of the job's cluster (not started); it never idles out, the job ends it."""
        if job.request is None:
            raise JobError(f"job {job.id} has no cluster")
        return backend_for(self.config, job_cluster_name(job.user, job.id), request=job.request,
                           owner=owner, identity=Identity(job.user), idle_timeout=0)
