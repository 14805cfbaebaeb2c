"""Background services of the embedded facility: start once, find again, stop for good.

Each service runs in its own process group (so stopping it also stops whatever it forked), logs
to ``<state>/logs/<name>.log`` and is recorded in ``<state>/run/<name>.json`` with its pid and
process start time: a stale record, or a pid reused by an unrelated process, is never mistaken
for a running service, and a second ``up`` leaves a running service alone.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from facility.errors import InfrastructureError

START_MARK = "--- starting"  # opens each start's part of a service log, see last_start


class ServiceError(InfrastructureError, RuntimeError):
    """A service did not start or stop; the message points at its log."""


class NotReady(Exception):
    """Raised by a service's readiness check to say why the service is not ready yet (what
    a service that never gets ready is reported with)."""


@dataclass
class Service:
    """How to run one background process and how to tell that it is ready."""

    name: str
    argv: list[str]
    ports: list[int] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    ready: Callable[[], bool] | None = None  # may raise NotReady to say why not
    start_timeout: float = 60.0
    description: str = ""


@dataclass
class ServiceState:
    name: str
    running: bool
    pid: int | None
    ports: list[int]
    healthy: bool
    description: str
    log: Path


def live_process(record: dict) -> psutil.Process | None:
    """The live process a record (``pid``, ``create_time``) names: a pid reused by another
    process, or a zombie, is not it."""
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) < 1.0 and proc.status() != "zombie":
            return proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError):
        pass
    return None


class Supervisor:
    """Starts, finds and stops services whose records live under one state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.run_dir = state_dir / "run"
        self.log_dir = state_dir / "logs"

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _record_path(self, name: str) -> Path:
        return self.run_dir / f"{name}.json"

    def _read_record(self, name: str) -> dict | None:
        try:
            return json.loads(self._record_path(name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def process(self, name: str) -> psutil.Process | None:
        """The live process of a service, or None (stale records are removed, and whatever the
        dead service left running in its process group is ended)."""
        record = self._read_record(name)
        if record is None:
            return None
        proc = live_process(record)
        if proc is None:
            _end_leftovers(record)
            self._record_path(name).unlink(missing_ok=True)
        return proc

    def start(self, service: Service) -> tuple[psutil.Process, bool]:
        """Start a service unless it already runs; returns (process, started_now).

        Commands started together agree through a lock: one starts the service, the others
        wait for it and find it running.
        """
        lock = self.run_dir / f"{service.name}.lock"
        with file_lock(lock, service.start_timeout + 30, f"{service.name} to start"):
            return self._start_unlocked(service)

    def _start_unlocked(self, service: Service) -> tuple[psutil.Process, bool]:
        existing = self.process(service.name)
        if existing is not None:
            return existing, False
        busy = [port for port in service.ports if port_open(port)]
        if busy:
            raise ServiceError(
                f"cannot start {service.name}: port {busy[0]} is already in use by another "
                f"program; choose other ports in the configuration"
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path(service.name)
        with open(log, "ab") as out:
            out.write(f"\n{START_MARK} {service.name}: {' '.join(service.argv)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                service.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=service.cwd, env={**os.environ, **service.env}, start_new_session=True,
            )
        handle = psutil.Process(proc.pid)
        self._record_path(service.name).write_text(json.dumps({
            "pid": proc.pid, "create_time": handle.create_time(), "argv": service.argv,
            "ports": service.ports,
        }))
        self._wait_ready(service, proc, log)
        return handle, True

    def _wait_ready(self, service: Service, proc: subprocess.Popen, log: Path) -> None:
        deadline = time.monotonic() + service.start_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._record_path(service.name).unlink(missing_ok=True)
                raise ServiceError(
                    f"{service.name} exited with code {proc.returncode} while starting; "
                    f"last lines of {log}:\n{tail(log)}"
                )
            why_not = not_ready_because(service)
            if why_not is None:
                return
            time.sleep(0.1)
        self.stop(service.name)
        raise ServiceError(f"{service.name} was not ready after {service.start_timeout:.0f} s "
                           f"({why_not}); last lines of {log}:\n{tail(log)}")

    @staticmethod
    def _is_ready(service: Service) -> bool:
        return not_ready_because(service) is None

    def stop(self, name: str, timeout: float = 15.0) -> bool:
        """Stop a service and its process group; returns whether it was running."""
        proc = self.process(name)
        if proc is None:
            return False
        group = _process_group(proc.pid)
        members = [proc, *proc.children(recursive=True)]
        _signal_all(group, proc, members, signal.SIGTERM)
        _gone, alive = psutil.wait_procs(members, timeout=timeout)
        if alive:
            _signal_all(group, proc, alive, signal.SIGKILL)
            psutil.wait_procs(alive, timeout=5)
        self._record_path(name).unlink(missing_ok=True)
        return True

    def state(self, service: Service) -> ServiceState:
        proc = self.process(service.name)
        healthy = proc is not None and self._is_ready(service)
        return ServiceState(service.name, proc is not None, proc.pid if proc else None,
                            service.ports, healthy, service.description,
                            self.log_path(service.name))


def _end_leftovers(record: dict) -> None:
    """A service died (a SIGKILL, a crash) but its children may live on in its process group,
    such as the worker processes of a killed scheduler: end them. A pid now used by another
    process is left alone."""
    pid = record.get("pid")
    if not isinstance(pid, int):
        return
    try:
        leader = psutil.Process(pid)
        if leader.status() != psutil.STATUS_ZOMBIE:
            return  # the pid was reused: that process and its group are not ours
    except psutil.NoSuchProcess:
        pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float, waiting_for: str) -> Iterator[None]:
    """An exclusive lock among the processes of this machine; the kernel releases it when its
    holder dies, so a killed command never leaves it stuck."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ServiceError(f"waited {timeout:.0f} s for {waiting_for}: another "
                                       f"command holds {path}") from None
                time.sleep(0.1)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _signal_all(group: int | None, proc: psutil.Process, members: list[psutil.Process],
                sig: signal.Signals) -> None:
    """The service's process group, and its descendants that started a session of their own
    (JupyterHub starts its managed services so): stopping a service leaves nothing behind."""
    _signal(group, proc, sig)
    for member in members:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            if _process_group(member.pid) != group:
                member.send_signal(sig)


def _signal(group: int | None, proc: psutil.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError, psutil.NoSuchProcess):
        if group is not None and group != os.getpgid(0):
            os.killpg(group, sig)
        else:
            proc.send_signal(sig)


def not_ready_because(service: Service) -> str | None:
    """Why a service is not ready (a port nothing accepts connections on, or what its own
    check says), or None when it is."""
    closed = [str(port) for port in service.ports if not port_open(port)]
    if closed:
        return f"nothing accepts connections on port {', '.join(closed)}"
    if service.ready is None:
        return None
    try:
        return None if service.ready() else "its readiness check did not pass"
    except NotReady as reason:
        return str(reason)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def last_start(path: Path) -> list[str]:
    """The lines a service logged since it was last started: what this run of it said."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return []
    _, mark, since = text.rpartition(f"\n{START_MARK} ")
    return since.splitlines()[1:] if mark else since.splitlines()


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"
