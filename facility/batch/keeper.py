"""The keeper of a local batch job: the job's whole process tree ends with the job.

Every process of a job carries the job's mark, ``FACILITY_JOB_TAG`` (a value of its own per
job) in its environment, inherited from the job process whatever session or process group it
moves into: the notebook's kernel and the job's Dask cluster run in sessions of their own, and a
script may start daemons. The keeper is the job process's parent. However the job process ends
(it finished, failed, was cancelled or was SIGKILLed), the keeper then stops every process that
still carries the mark, so nothing of the job runs on or writes into its folder. If the keeper
itself is killed, the job process is told (``PR_SET_PDEATHSIG``) and stops the same way.

    python -P keeper.py launch ARGV_JSON LOG CWD TAG   # start a detached keeper, print the handle
    python -P keeper.py keep ARGV_JSON TAG REPORT_FD   # (the keeper itself) run ARGV, then sweep

The file runs as a script (``-P``: its folder is not put on the module path), not as ``-m
facility.batch.keeper``: it imports nothing of the facility, so a keeper costs its job no more
than an interpreter.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from typing import Any

import psutil

TAG_ENV = "FACILITY_JOB_TAG"
STOP_GRACE_SECONDS = 5.0
SWEEP_ROUNDS = 5  # a process may start another while the sweep stops it
PR_SET_PDEATHSIG = 1


def tagged(tag: str, spare: Collection[int] = ()) -> list[psutil.Process]:
    """The live processes that carry the job's mark (another account's are not readable)."""
    found = []
    for proc in psutil.process_iter():
        if proc.pid in spare:
            continue
        try:
            if proc.environ().get(TAG_ENV) == tag:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _running(proc: psutil.Process) -> bool:
    """A zombie has ended: only its parent's bookkeeping is left."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal_and_wait(procs: list[psutil.Process], signum: int, grace: float) -> list[psutil.Process]:
    """Send ``signum`` to each; those still running after ``grace`` seconds."""
    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.Error:
            continue
    deadline = time.monotonic() + grace
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _running(p)]
    return alive


def end_tagged(tag: str, spare: Collection[int] = (), grace: float = STOP_GRACE_SECONDS) -> list[int]:
    """Stop every process of the job but ``spare`` (and this one): SIGTERM, then SIGKILL for
    those still running after ``grace`` seconds. Returns the pids it stopped."""
    spared = {os.getpid(), *spare}
    ended: list[int] = []
    for _round in range(SWEEP_ROUNDS):
        members = [p for p in tagged(tag, spared) if p.pid not in ended]
        if not members:
            break
        stubborn = _signal_and_wait(members, signal.SIGTERM, grace)
        _signal_and_wait(stubborn, signal.SIGKILL, grace)
        ended += [p.pid for p in members]
    return ended


def describe_exit(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def _die_with_parent(parent: int) -> None:
    """In the job process before it runs: SIGTERM when the keeper dies, however it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the keeper died before the request took hold
        os.kill(os.getpid(), signal.SIGTERM)


def keeper_command() -> list[str]:
    return [sys.executable, "-P", os.path.abspath(__file__)]


def handle(proc: psutil.Process, keeper: psutil.Process, tag: str) -> dict[str, Any]:
    """How the job is found: its process, its keeper and its mark."""
    return {"pid": proc.pid, "create_time": proc.create_time(), "keeper": keeper.pid,
            "keeper_create_time": keeper.create_time(), "tag": tag}


def keep(argv: list[str], tag: str, report_fd: int) -> int:
    """Run the job process, tell the launcher where it is, sweep once it has ended."""
    me = os.getpid()
    job = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env={**os.environ, TAG_ENV: tag},
                           start_new_session=True, preexec_fn=lambda: _die_with_parent(me))
    with os.fdopen(report_fd, "w") as report:
        report.write(json.dumps(handle(psutil.Process(job.pid), psutil.Process(me), tag)))
    signal.signal(signal.SIGTERM, lambda _signum, _frame: job.send_signal(signal.SIGTERM))
    code = job.wait()
    left = end_tagged(tag)
    if left:
        print(f"job keeper: the job process (pid {job.pid}) {describe_exit(code)}; stopped what it "
              f"left running: pid {', '.join(map(str, left))}", flush=True)
    return 0


def launch(argv: list[str], log: str, cwd: str, tag: str) -> int:
    """Start a keeper in a session of its own (nobody's child once this returns) and print the
    job's handle."""
    os.umask(0o077)  # the log and whatever the job writes: its user's only
    read, write = os.pipe()
    with open(log, "ab") as out:
        subprocess.Popen([*keeper_command(), "keep", json.dumps(argv), tag, str(write)],
                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                         start_new_session=True, pass_fds=(write,))
    os.close(write)
    with os.fdopen(read) as report:
        text = report.read()
    if not text:
        print(f"the job's keeper ended before it started the job; see {log}", file=sys.stderr)
        return 1
    print(text)
    return 0


def main(args: list[str]) -> int:
    if args[0] == "launch":
        return launch(json.loads(args[1]), args[2], args[3], args[4])
    return keep(json.loads(args[1]), args[2], int(args[3]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
