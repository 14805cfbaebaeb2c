"""The job itself: ``python -m facility.batch.job JOB_ID``, in the user's environment.

The same entry point runs in a detached local process and in the pod of a DaskJob. It gives the
job its Dask cluster (``connect()`` in the notebook or script attaches to it), runs the notebook
with papermill or the script with its arguments, writes the executed notebook, the log and
``job.json`` into the job's output folder, records the outcome and, as its last act, starts the
next queued job of its user. The notebook or script writes its own outputs into the folder
named by ``FACILITY_JOB_OUTPUT`` (:func:`facility.batch.output_folder`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType

from facility.batch.base import JobRunner, runner_for
from facility.batch.inputs import script_command
from facility.batch.keeper import TAG_ENV, end_tagged
from facility.batch.model import JOB_ID_ENV, JOB_OUTPUT_ENV, RECORD_FILE, Failure, Job, JobState
from facility.cluster.connect import job_cluster_environment
from facility.config import load_config
from facility.text import plural

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class JobStopped(SystemExit):
    """The job was asked to stop (cancelled): clean up, record nothing over the cancellation."""


@dataclass(frozen=True)
class Outcome:
    state: JobState
    exit_code: int | None = None
    failure: Failure | None = None


def _stop(signum: int, _frame: FrameType | None) -> None:
    raise JobStopped(128 + signum)


def run_notebook(runner: JobRunner, job: Job, notebook: Path, cwd: Path) -> Outcome:
    """papermill: parameters injected after the ``parameters`` cell, every cell's output in the
    log, the executed notebook (with the error marked) in the output folder."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            str(notebook), str(job.output_dir / Path(job.path).name), parameters=job.parameters,
            cwd=str(cwd), kernel_name=runner.config.batch.kernel, progress_bar=False,
            log_output=True, execution_timeout=runner.config.batch.cell_timeout)
    except PapermillExecutionError as exc:
        return Outcome("failed", 1, Failure(
            f"In [{exc.exec_count}] raised {exc.ename}: {exc.evalue}", exc.cell_index,
            exc.exec_count, exc.source, ANSI.sub("", "\n".join(exc.traceback))))
    return Outcome("succeeded", 0)


def run_script(job: Job, script: Path, cwd: Path) -> Outcome:
    """The script with its arguments; its output goes to the job's log."""
    code = subprocess.run(script_command(script, job.args, sys.executable), cwd=cwd,
                          stdin=subprocess.DEVNULL, check=False).returncode
    if code == 0:
        return Outcome("succeeded", 0)
    why = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
    return Outcome("failed", code, Failure(f"{Path(job.path).name} {why}"))


def execute(runner: JobRunner, job: Job) -> Outcome:
    """Run the job on its own cluster (if it asked for one); the cluster ends with the job."""
    job.output_dir.mkdir(parents=True, exist_ok=True)
    snapshot, _environment = runner.inputs(job)
    cwd = Path(job.path).parent if Path(job.path).parent.is_dir() else job.output_dir
    os.environ.update({JOB_ID_ENV: str(job.id), JOB_OUTPUT_ENV: str(job.output_dir)})
    with runner.cluster(job) as backend:
        if backend is not None and job.request is not None:
            os.environ.update(job_cluster_environment(backend.name, job.request))
            print(f"job {job.id}: Dask cluster {backend.name!r} ({job.request.describe()})",
                  flush=True)
        if job.kind == "notebook":
            return run_notebook(runner, job, snapshot, cwd)
        return run_script(job, snapshot, cwd)


def stop_leftovers(job: Job) -> None:
    """What the job started and left running (a script's daemon, a kernel that did not stop)
    ends before the outcome is recorded: nothing of an ended job writes into its folder."""
    tag = os.environ.get(TAG_ENV)
    if not tag:  # not started by a keeper (a pod): the pod ends with the job
        return
    left = end_tagged(tag)
    if left:
        print(f"job {job.id}: stopped {plural(len(left), 'process', 'processes')} it left running "
              f"(pid {', '.join(map(str, left))})", flush=True)


def record(runner: JobRunner, job: Job, outcome: Outcome) -> None:
    """``job.json``, then the outcome into the store (unless the job was cancelled meanwhile).

    In that order: whoever waits for the job to end (``job.wait()``, then ``job.outputs()``)
    finds its record among the outputs. A job cancelled meanwhile gets the store's record."""
    error = outcome.failure.message if outcome.failure else None
    ended = replace(job, state=outcome.state, finished=time.time(), exit_code=outcome.exit_code,
                    error=error)
    _write_record(ended, outcome)
    if not runner.store.finish(job.id, outcome.state, outcome.exit_code, error, ended.finished):
        ended = runner.store.get(job.id) or ended
        _write_record(ended, outcome)
    if outcome.failure:
        print(outcome.failure.report(), flush=True)
    print(f"job {job.id}: {ended.state}", flush=True)


def _write_record(job: Job, outcome: Outcome) -> None:
    summary = job.record()
    summary["failure"] = outcome.failure.__dict__ if outcome.failure else None
    summary["outputs"] = [str(p.relative_to(job.output_dir)) for p in job.output_files()
                          if p.name != RECORD_FILE]
    job.output_dir.mkdir(parents=True, exist_ok=True)
    (job.output_dir / RECORD_FILE).write_text(json.dumps(summary, indent=2, default=str))


def main(argv: list[str]) -> int:
    os.umask(0o077)  # outputs and records of a job are its user's only, on any runner
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
    config = load_config()
    runner = runner_for(config)
    job = runner.store.get(int(argv[0]))
    if job is None or not runner.store.set_handle(job.id, runner.own_handle()):
        print(f"job {argv[0]} is no longer to be run ({job.state if job else 'unknown'})", flush=True)
        return 0
    signal.signal(signal.SIGTERM, _stop)
    print(f"job {job.id} of {job.user}: {job.kind} {job.path} on {runner.runner_name} "
          f"(pid {os.getpid()})", flush=True)
    outcome = Outcome("failed", 1, Failure("the job stopped before it ran"))
    try:
        outcome = execute(runner, job)
    except JobStopped as exc:
        outcome = Outcome("failed", int(exc.code or 1), Failure("the job was stopped"))
    except Exception as exc:  # noqa: BLE001 (whatever the job raised is its recorded failure)
        outcome = Outcome("failed", 1, Failure(f"{type(exc).__name__}: {exc}",
                                               traceback=traceback.format_exc()))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        stop_leftovers(job)
        record(runner, job, outcome)
        runner.start_queued(job.user)
    return 0 if outcome.state == "succeeded" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
