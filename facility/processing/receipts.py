"""What a worker hands back for one try of a task: a receipt of success, or a classified failure.

Workers never raise for a failure they understand. They return a :class:`Failure` that says
which of three parties it concerns (the data of one replica, the user's code, or the facility),
and the client's policy decides what follows: the next replica, a retry, a skip or the end of
the run. Only these small records cross the network besides the accumulators themselves.

The classification of a read error is a table (:data:`UNAVAILABLE_SIGNS`), tested row by row:
an unreachable server is not a damaged file, and neither is a bug in the analysis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

ReplicaProblem = Literal["unavailable", "damaged", "refused"]
FailureKind = Literal["input", "user", "killed-worker", "scheduler-lost"]


@dataclass(frozen=True)
class ReplicaFailure:
    """Why one replica of a file could not be read."""

    url: str
    problem: ReplicaProblem
    reason: str

    def describe(self) -> str:
        what = {"unavailable": "server unavailable", "refused": "access refused"}.get(
            self.problem, "damaged")
        return f"{self.url} ({what}): {self.reason}"


@dataclass(frozen=True)
class Failure:
    """One failed try of a chunk or a preflight, as the worker (or the dispatcher) saw it."""

    kind: FailureKind
    replicas: tuple[ReplicaFailure, ...] = ()
    message: str = ""
    where: str | None = None  # the user's code: "path/to/file.py:42 in process"
    traceback: str | None = None
    worker: str | None = None

    @property
    def every_replica_damaged(self) -> bool:
        """Bad data: each replica tried was read and found damaged (none was merely down)."""
        return bool(self.replicas) and all(r.problem == "damaged" for r in self.replicas)

    @property
    def refused(self) -> bool:
        """A server refused the user's credentials, and no replica was found damaged."""
        problems = {r.problem for r in self.replicas}
        return "refused" in problems and "damaged" not in problems

    @property
    def unavailable_endpoints(self) -> set[str]:
        from facility.processing.plan import endpoint

        return {endpoint(r.url) for r in self.replicas if r.problem == "unavailable"}

    def describe_replicas(self) -> str:
        return "; ".join(r.describe() for r in self.replicas) or self.message


@dataclass(frozen=True)
class ChunkDone:
    """A processed chunk: the processor's accumulator and how it was obtained."""

    chunk_id: str
    output: Any
    events: int
    replica: str
    worker: str
    seconds: float
    columns: tuple[str, ...] = ()
    replicas_failed: tuple[ReplicaFailure, ...] = ()


@dataclass(frozen=True)
class Inspected:
    """A preflight that found a readable replica."""

    info: Any  # plan.FileInfo (kept loose: this module is imported on workers first)
    worker: str
    replicas_failed: tuple[ReplicaFailure, ...] = ()


@dataclass(frozen=True)
class BundleDone:
    """A bundle of chunks processed on one worker. The chunks' results were merged there into
    the worker's own accumulator for the run (``holder``); each done chunk has a receipt
    without its output. Chunks after a failure of the user's code are left unattempted."""

    holder: str
    done: tuple[ChunkDone, ...]
    failures: tuple[tuple[str, Failure], ...] = ()
    unattempted: tuple[str, ...] = ()
    absorbed: bool = True  # False: the worker refused the merge (it already held one of them)
    worker: str | None = None


Receipt = ChunkDone | Inspected | BundleDone


# An OSError whose text carries one of these signs came from a server that could not be
# reached or did not answer in time; any other read error means the replica's bytes are bad.
UNAVAILABLE_SIGNS = (
    "connection refused", "connection reset", "connection error", "connection timed out",
    "socket error", "operation expired", "no route to host", "network is unreachable",
    "cannot connect to host", "server disconnected", "broken pipe", "timed out",
    "name or service not known", "temporary failure in name resolution",
    "stream error", "invalid address", "unable to connect",
    # a server this client cannot trust (its certificate) cannot be read, whatever the file
    "tls error", "certificate verify failed",
)
# ...and one of these, from a server that would not let this user read (no token, or a token
# it does not accept): neither the server nor the bytes are at fault.
REFUSED_SIGNS = (
    "auth failed", "permission denied", "forbidden", "unauthorized", "not authorized",
)


# Raised by the XRootD client for a file whose session the server dropped (it was restarted):
# the connection is gone, not the bytes.
SESSION_GONE = "i/o operation on closed file"


def replica_problem(exc: BaseException) -> ReplicaProblem:
    """Whether a read error means the server is unavailable, refused the user, or the replica
    is damaged."""
    text = str(exc).lower()
    if isinstance(exc, PermissionError) or any(sign in text for sign in REFUSED_SIGNS):
        return "refused"
    if isinstance(exc, TimeoutError | ConnectionError):
        return "unavailable"
    if isinstance(exc, ValueError) and SESSION_GONE in str(exc).lower():
        return "unavailable"
    if isinstance(exc, FileNotFoundError):
        return "damaged"  # the server answered: this replica does not exist
    if isinstance(exc, OSError) and any(sign in text for sign in UNAVAILABLE_SIGNS):
        return "unavailable"
    cause = exc.__cause__ or exc.__context__
    if cause is not None and cause is not exc and isinstance(cause, OSError):
        return replica_problem(cause)
    return "damaged"


def short(exc: BaseException) -> str:
    """One line naming the exception type and its message."""
    text = f"{type(exc).__name__}: {exc}".strip()
    first = " ".join(text.split())
    return first[:400]
