"""Local job runner: every job is a detached process on this machine.

A job process is started through a short-lived launcher, so it is nobody's child: not the
notebook kernel's, not the notebook server's. It runs in a session of its own with its input
closed and its output in the job's log, so stopping the user's server (the spawner signals the
server's process; the server shuts its kernels down) or the idle culler leaves it running. Its
parent is the job's keeper (:mod:`facility.batch.keeper`): every process of the job carries the
job's mark, and once the job process has ended, however it ended (a SIGKILL too), the keeper
stops whatever still carries it. Its Dask cluster is a local cluster owned by the job process:
it ends with the job, however the job ends.

Cancelling stops the whole process tree (the job process, the notebook's kernel, which runs in
a session of its own, the cluster's scheduler and workers, anything the script started) and
removes the cluster's record.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from facility.batch.base import JobRunner
from facility.batch.keeper import TAG_ENV, end_tagged, keeper_command
from facility.batch.model import Job, JobError, JobState
from facility.cluster.base import ClusterBackend, Owner
from facility.embedded.services import live_process

KILL_GRACE_SECONDS = 10.0
LAUNCH_TIMEOUT_SECONDS = 60.0


def stop_tree(proc: psutil.Process, grace: float = KILL_GRACE_SECONDS) -> None:
    """Terminate a process and all its descendants, wherever their sessions; kill what lingers."""
    try:
        members = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in members:
        try:
            member.terminate()
        except psutil.NoSuchProcess:
            continue
    _gone, alive = psutil.wait_procs(members, timeout=grace)
    for member in alive:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=grace)


class LocalRunner(JobRunner):
    """Detached job processes on this machine, each with a local Dask cluster of its own."""

    runner_name = "local"

    def launch(self, job: Job) -> dict[str, Any]:
        _snapshot, environment = self.inputs(job)
        job.output_dir.mkdir(parents=True, exist_ok=True)
        job.output_dir.chmod(0o700)
        argv = [sys.executable, "-m", "facility.batch.job", str(job.id)]
        tag = f"{job.id}-{secrets.token_hex(8)}"
        launched = subprocess.run(
            [*keeper_command(), "launch", json.dumps(argv), str(job.log_path), str(job.output_dir), tag],
            env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS,
            check=False)
        if launched.returncode != 0:
            raise JobError(f"job {job.id} could not be started: {launched.stderr.strip()}")
        return dict(json.loads(launched.stdout))

    def own_handle(self) -> dict[str, Any]:
        me = psutil.Process()
        found: dict[str, Any] = {"pid": me.pid, "create_time": me.create_time()}
        if os.environ.get(TAG_ENV):
            keeper = me.parent()
            found.update(tag=os.environ[TAG_ENV], keeper=keeper.pid if keeper else None,
                         keeper_create_time=keeper.create_time() if keeper else None)
        return found

    def ended(self, job: Job) -> tuple[JobState, str | None] | None:
        if live_process(job.handle) is not None:
            return None
        self._end_leftovers(job)  # its keeper should have; it may have been killed as well
        return ("failed", f"the job process (pid {job.handle.get('pid')}) ended without recording "
                          f"how: killed, out of memory, or the machine restarted; see {job.log_path}")

    def kill(self, job: Job) -> None:
        proc = live_process(job.handle)
        if proc is not None:
            stop_tree(proc)
        self._end_leftovers(job)
        if job.request is not None:
            self.cluster_backend(job).stop()

    @staticmethod
    def _end_leftovers(job: Job) -> None:
        """Whatever of the job still runs, and its keeper: once this returns, nothing of the
        job writes into its folder."""
        if job.handle.get("tag"):
            end_tagged(str(job.handle["tag"]), grace=KILL_GRACE_SECONDS)
        keeper = live_process({"pid": job.handle["keeper"],
                               "create_time": job.handle["keeper_create_time"]}) \
            if job.handle.get("keeper") else None
        if keeper is not None:
            psutil.wait_procs([keeper], timeout=KILL_GRACE_SECONDS)

    @contextmanager
    def cluster(self, job: Job) -> Iterator[ClusterBackend | None]:
        if job.request is None:
            yield None
            return
        backend = self.cluster_backend(job, owner=Owner.this_process())
        backend.start()
        try:
            yield backend
        finally:
            backend.stop()
