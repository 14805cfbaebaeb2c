"""Who is asking for a cluster, what they asked for, and what their limits let them have.

A request above a limit is not refused: it is clamped, and the message says which limit of which
user or VO group did it, so a physicist knows whom to ask.
"""

from __future__ import annotations

import getpass
import os
import sys
from dataclasses import dataclass, field, replace

from dask.utils import format_bytes, parse_bytes

from facility.config import FacilityConfig, Limits
from facility.errors import UsageError
from facility.text import plural

USER_ENV = "JUPYTERHUB_USER"
GROUPS_ENV = "FACILITY_GROUPS"


@dataclass(frozen=True)
class Identity:
    """The user a cluster belongs to and the VO groups the hub put them in."""

    user: str
    groups: tuple[str, ...] = ()

    @classmethod
    def current(cls, environ: dict[str, str] | None = None) -> Identity:
        """From the hub's environment in a notebook, else the account running this process."""
        env = os.environ if environ is None else environ
        user = env.get(USER_ENV) or getpass.getuser()
        groups = tuple(g for g in env.get(GROUPS_ENV, "").replace(",", " ").split() if g)
        return cls(user, groups)


@dataclass(frozen=True)
class WorkerRequest:
    """Cluster size and worker shape, as asked for and then as granted."""

    min_workers: int
    max_workers: int
    threads: int
    memory: int
    gpus: int = 0
    notes: tuple[str, ...] = field(default=())

    @classmethod
    def from_config(cls, config: FacilityConfig, **asked: int | str | None) -> WorkerRequest:
        """The configured defaults with whatever the caller set explicitly."""
        c = config.cluster
        memory = asked.get("memory")
        request = cls(
            min_workers=int(_pick(asked.get("min_workers"), c.min_workers)),
            max_workers=int(_pick(asked.get("max_workers"), c.max_workers)),
            threads=int(_pick(asked.get("threads"), c.threads_per_worker)),
            memory=parse_bytes(memory if isinstance(memory, str) else c.memory_limit)
            if not isinstance(memory, int) else memory,
            gpus=int(_pick(asked.get("gpus"), c.gpus_per_worker)),
        )
        if request.min_workers > request.max_workers:
            request = replace(request, max_workers=request.min_workers)
        return request

    @classmethod
    def from_record(cls, record: dict) -> WorkerRequest:
        """Back from the JSON a cluster's spec file keeps (``dataclasses.asdict``)."""
        return cls(**{**record, "notes": tuple(record.get("notes", ()))})

    def describe(self) -> str:
        """``2..8 workers of 4 threads, 8.00 GiB`` (``1 worker of 1 thread`` for one)."""
        gpu = f", {plural(self.gpus, 'GPU')}" if self.gpus else ""
        span = str(self.min_workers) if self.min_workers == self.max_workers else \
            f"{self.min_workers}..{self.max_workers}"
        workers = "worker" if self.max_workers == 1 else "workers"
        return (f"{span} {workers} of {plural(self.threads, 'thread')}, "
                f"{format_bytes(self.memory)}{gpu}")



def _pick(value: int | str | None, default: int) -> int | str:
    return default if value is None else value


def report_clamps(notes: tuple[str, ...]) -> None:
    """Tell the user (a notebook shows stderr) what their limits cut."""
    for note in notes:
        print(f"facility: request clamped: {note}", file=sys.stderr)


def granted_request(config: FacilityConfig, who: Identity, **asked: int | str | None) -> WorkerRequest:
    """What ``who`` gets of what they asked for (configured defaults for the rest), clamped by
    their limits; what was cut is reported."""
    limits, source = limits_for(config, who)
    request = clamp(WorkerRequest.from_config(config, **asked), limits, source)
    report_clamps(request.notes)
    return request


def limits_for(config: FacilityConfig, who: Identity) -> tuple[Limits, str]:
    """The limits that apply and where they come from (for messages)."""
    table = config.cluster.limits
    if who.user in table.users:
        return table.users[who.user], f"user {who.user!r}"
    granted = [(name, table.groups[name]) for name in who.groups if name in table.groups]
    if granted:
        name, best = max(granted, key=lambda item: _generosity(item[1]))
        return best, f"VO group {name!r}"
    return table.default, "the default limits"


def _generosity(limits: Limits) -> tuple[float, ...]:
    unlimited = float("inf")
    memory = parse_bytes(limits.memory) if limits.memory else unlimited
    return tuple(unlimited if v is None else float(v)
                 for v in (limits.cores, limits.workers, memory, limits.gpus))


def clamp(request: WorkerRequest, limits: Limits, source: str) -> WorkerRequest:
    """The largest request within ``limits``; ``notes`` say what was cut and by which limit."""
    notes = list(request.notes)
    gpus = request.gpus
    if limits.gpus is not None and gpus > limits.gpus:
        notes.append(f"gpus per worker {gpus} -> {limits.gpus}: {source} allows {limits.gpus} GPUs")
        gpus = limits.gpus
    ceilings = {"workers": limits.workers}
    if limits.cores is not None:
        ceilings["cores"] = limits.cores // request.threads
    if limits.memory is not None:
        ceilings["memory"] = parse_bytes(limits.memory) // request.memory
    if limits.gpus is not None and gpus:
        ceilings["gpus"] = limits.gpus // gpus
    maximum = request.max_workers
    for what, ceiling in ceilings.items():
        if ceiling is not None and maximum > ceiling:
            allowed = getattr(limits, what)
            notes.append(f"max workers {maximum} -> {ceiling}: {source} allows {what}={allowed}"
                         + (f" ({_shape(replace(request, gpus=gpus), what)} per worker)"
                            if what != "workers" else ""))
            maximum = ceiling
    if maximum < 1:
        raise LimitError(f"{source} leaves no room for one worker of {request.describe()}; "
                         "ask for smaller workers or ask the facility for more")
    minimum = min(request.min_workers, maximum)
    return replace(request, min_workers=minimum, max_workers=maximum, gpus=gpus, notes=tuple(notes))


def _shape(request: WorkerRequest, what: str) -> str:
    return {"cores": f"{request.threads} threads", "memory": format_bytes(request.memory),
            "gpus": f"{request.gpus} GPUs"}[what]


class LimitError(UsageError, ValueError):
    """Not even one worker of the asked size fits the user's limits."""
