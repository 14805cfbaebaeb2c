"""Batch jobs: a notebook or script that runs unattended, on a Dask cluster of its own.

    job = facility.submit("zpeak_job.ipynb", parameters={"dataset": "DYJetsToMuMu"}, workers=4)
    job.state                     # queued, running, succeeded, failed, cancelled
    job.wait()                    # until it ends (the job does not need this notebook)
    print(job.logs())             # ends with the failing cell and its traceback, if one failed
    job.outputs()                 # executed notebook, job.json, and what the notebook wrote
    job.cancel()

The job survives the notebook server: it may be stopped, or culled, while the job runs.
Notebooks write their outputs into :func:`output_folder`. The command line has the same:
``facility submit`` and ``facility jobs list|status|logs|cancel|outputs``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from facility.batch.base import JobRunner, runner_for
from facility.batch.model import (
    FINISHED,
    JOB_OUTPUT_ENV,
    Job,
    JobAccessError,
    JobError,
    JobInputError,
    JobState,
)
from facility.cluster.limits import Identity
from facility.config import FacilityConfig, load_config

__all__ = ["Job", "JobAccessError", "JobError", "JobHandle", "JobInputError", "cancel", "job",
           "jobs", "output_folder", "submit"]


class JobHandle:
    """A job of the current user, as seen from a notebook or a script."""

    def __init__(self, runner: JobRunner, record: Job) -> None:
        self.runner, self.record = runner, record

    @property
    def id(self) -> int:
        return self.record.id

    @property
    def state(self) -> JobState:
        return self.refresh().state

    @property
    def output_dir(self) -> Path:
        return self.record.output_dir

    def refresh(self) -> Job:
        self.record = self.runner.status(self.id, Identity(self.record.user))
        return self.record

    def wait(self, timeout: float | None = None, poll: float = 2.0,
             progress: bool = True) -> Job:
        """Until the job has ended (or ``timeout`` seconds passed); returns its record.
        ``progress`` shows the job's state and the end of its log meanwhile (an updating
        output in a notebook; on a terminal each new state and log line once)."""
        from facility.processing.progress import JobWatch, job_headline

        watch = JobWatch() if progress else None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.refresh()
            if watch is not None:
                watch.update(job_headline(job.id, job.name, job.state, job.started),
                             job.state, self.runner.logs(job))
            if job.state in FINISHED or (deadline is not None and time.monotonic() >= deadline):
                return job
            time.sleep(poll)

    def logs(self) -> str:
        return self.runner.logs(self.refresh())

    def outputs(self) -> list[Path]:
        """Every file in the job's output folder."""
        return self.record.output_files()

    def cancel(self) -> Job:
        self.record, _before = self.runner.cancel(self.id, Identity(self.record.user))
        return self.record

    def __repr__(self) -> str:
        job = self.record
        return (f"<Job {job.id} {job.name!r} {job.state} ({job.describe_request()}) "
                f"output={job.output}>")


def submit(path: str | Path, parameters: dict[str, Any] | None = None, *,
           args: list[str] | None = None, workers: int | None = None,
           min_workers: int | None = None, max_workers: int | None = None,
           threads: int | None = None, memory: str | None = None, gpus: int | None = None,
           name: str | None = None, config: FacilityConfig | None = None) -> JobHandle:
    """Run a notebook (with papermill ``parameters``) or a script (with ``args``) as a batch job.

    The job gets a Dask cluster of its own, ``workers`` strong (default ``batch.workers``; 0: no
    cluster), within the user's limits; it starts now, or when one of the user's running jobs
    ends (``batch.max_running_per_user``). A missing file or a parameter the notebook does not
    declare is refused here, naming it.
    """
    runner = runner_for(config or load_config())
    asked = {"workers": workers, "min_workers": min_workers, "max_workers": max_workers,
             "threads": threads, "memory": memory, "gpus": gpus}
    return JobHandle(runner, runner.submit(path, parameters, args, name=name, asked=asked))


def job(job_id: int, config: FacilityConfig | None = None) -> JobHandle:
    """One of the current user's jobs."""
    runner = runner_for(config or load_config())
    return JobHandle(runner, runner.status(job_id))


def jobs(config: FacilityConfig | None = None) -> list[JobHandle]:
    """The current user's jobs, oldest first."""
    runner = runner_for(config or load_config())
    return [JobHandle(runner, record) for record in runner.jobs()]


def cancel(job_id: int, config: FacilityConfig | None = None) -> Job:
    return job(job_id, config).cancel()


def output_folder(config: FacilityConfig | None = None) -> Path:
    """Where a notebook writes its outputs: the job's output folder inside a batch job, else
    ``<output area>/<user>/interactive`` (so the same notebook runs both ways)."""
    inside = os.environ.get(JOB_OUTPUT_ENV)
    folder = Path(inside) if inside else \
        (config or load_config()).output_path / Identity.current().user / "interactive"
    folder.mkdir(parents=True, exist_ok=True)
    return folder
