"""What a batch job is: its input, its request, its state and how it ended.

A job moves ``queued -> running -> succeeded | failed``, or to ``cancelled`` from either of the
first two. A finished state is final: nothing moves a job out of it, so a job is counted once.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from facility.cluster.limits import Identity, WorkerRequest
from facility.errors import UsageError

JobState = Literal["queued", "running", "succeeded", "failed", "cancelled"]
ACTIVE: tuple[JobState, ...] = ("queued", "running")
FINISHED: tuple[JobState, ...] = ("succeeded", "failed", "cancelled")
JobKind = Literal["notebook", "script"]

JOB_ID_ENV = "FACILITY_JOB_ID"
JOB_OUTPUT_ENV = "FACILITY_JOB_OUTPUT"
LOG_FILE = "job.log"
RECORD_FILE = "job.json"


class JobError(UsageError, RuntimeError):
    """A job cannot be submitted, found or changed; the message names the job or the input."""


class JobInputError(UsageError, ValueError):
    """The submitted notebook, script or parameters are wrong; the message names the culprit."""


class JobAccessError(UsageError, LookupError):
    """A job id that does not exist, or belongs to another user."""


@dataclass(frozen=True)
class Failure:
    """Where a job failed: the notebook cell (source and traceback) or the script's exit."""

    message: str
    cell_index: int | None = None
    execution_count: int | None = None
    source: str | None = None
    traceback: str | None = None

    def report(self) -> str:
        """The text ``facility jobs logs`` ends with."""
        lines = [f"--- failed: {self.message}"]
        if self.source is not None:
            lines += [f"--- the failing cell, In [{self.execution_count}] (cell {self.cell_index} "
                      "of the executed notebook, counted from 0):",
                      *("    " + line for line in self.source.splitlines())]
        if self.traceback:
            lines += ["--- traceback:", self.traceback]
        return "\n".join(lines)


@dataclass(frozen=True)
class Job:
    """One row of the job store."""

    id: int
    user: str
    kind: JobKind
    path: str
    parameters: dict[str, Any]
    args: list[str]
    request: WorkerRequest | None
    runner: str
    name: str
    state: JobState
    submitted: float
    output: str
    started: float | None = None
    finished: float | None = None
    handle: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    error: str | None = None

    @property
    def output_dir(self) -> Path:
        return Path(self.output)

    def output_files(self) -> list[Path]:
        """Every file in the job's output folder (none before it has written any)."""
        folder = self.output_dir
        return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []

    @property
    def log_path(self) -> Path:
        return self.output_dir / LOG_FILE

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe_request(self) -> str:
        return self.request.describe() if self.request else "no cluster"

    def record(self) -> dict[str, Any]:
        """The job as JSON (``job.json`` in its output folder, ``facility jobs status --json``)."""
        data = asdict(self)
        for key in ("submitted", "started", "finished"):
            data[key] = timestamp(data[key])
        return data


def timestamp(seconds: float | None) -> str | None:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds") if seconds else None


def job_from_row(row: dict[str, Any]) -> Job:
    """Back from the store's columns (JSON in text columns)."""
    request = json.loads(row["request"])
    return Job(id=row["id"], user=row["user"], kind=row["kind"], path=row["path"],
               parameters=json.loads(row["parameters"]), args=json.loads(row["args"]),
               request=WorkerRequest.from_record(request) if request else None,
               runner=row["runner"], name=row["name"], state=row["state"],
               submitted=row["submitted"], output=row["output"], started=row["started"],
               finished=row["finished"], handle=json.loads(row["handle"] or "{}"),
               exit_code=row["exit_code"], error=row["error"])


def job_cluster_name(user: str, job_id: int) -> str:
    """``<user>-job-<id>``: the name of a job's Dask cluster (and DaskJob on Kubernetes)."""
    from facility.cluster.connect import cluster_name

    return cluster_name(Identity(user), f"job-{job_id}")
