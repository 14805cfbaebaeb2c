"""Local job runner: every job is a detached process on this machine.

A job process is started through a short-lived launcher, so it is nobody's child: not the
notebook kernel's, not the notebook server's. It runs in a session of its own with its input
closed and its output in the job's log, so stopping the user's server (the spawner signals the
server's process; the server shuts its kernels down) or the idle culler leaves it running. Its
Dask cluster is a local cluster owned by the job process: it ends with the job, however the job
ends.

Cancelling stops the whole process tree (the job process, the notebook's kernel, which runs in
a session of its own, the cluster's scheduler and workers) and removes the cluster's record.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from facility.batch.base import JobRunner
from facility.batch.model import Job, JobError, JobState
from facility.cluster.base import ClusterBackend, Owner
from facility.embedded.services import live_process

KILL_GRACE_SECONDS = 10.0
LAUNCH_TIMEOUT_SECONDS = 60.0
LAUNCHER = """
import json, os, subprocess, sys
import psutil
argv, log, cwd = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
os.umask(0o077)  # the log and whatever the job writes: its user's only
with open(log, "ab") as out:
    job = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                           cwd=cwd, start_new_session=True)
print(json.dumps({"pid": job.pid, "create_time": psutil.Process(job.pid).create_time()}))
"""


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
        launched = subprocess.run(
            [sys.executable, "-c", LAUNCHER, json.dumps(argv), str(job.log_path), str(job.output_dir)],
            env=environment, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_SECONDS,
            check=False)
        if launched.returncode != 0:
            raise JobError(f"job {job.id} could not be started: {launched.stderr.strip()}")
        return dict(json.loads(launched.stdout))

    def own_handle(self) -> dict[str, Any]:
        me = psutil.Process()
        return {"pid": me.pid, "create_time": me.create_time()}

    def ended(self, job: Job) -> tuple[JobState, str | None] | None:
        if live_process(job.handle) is not None:
            return None
        return ("failed", f"the job process (pid {job.handle.get('pid')}) ended without recording "
                          f"how: killed, out of memory, or the machine restarted; see {job.log_path}")

    def kill(self, job: Job) -> None:
        proc = live_process(job.handle)
        if proc is not None:
            stop_tree(proc)
        if job.request is not None:
            self.cluster_backend(job).stop()

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
