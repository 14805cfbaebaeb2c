"""Policy: what to do about a failed try. Pure functions, no cluster, millisecond tests.

=====================================  ==============================================
the failure                            what follows
=====================================  ==============================================
user's code raised                     the run stops: your code, file:line
a chunk killed its worker repeatedly   the run stops: your code (memory), chunk named
the scheduler was lost                 the run stops: the facility; resume it
a replica's server is unavailable      retry (unhealthy endpoints last); after
                                       ``retries`` tries the run stops: the facility
every replica damaged                  confirmed from a second worker or after
                                       ``retries`` tries, then bad input: skip it if
                                       asked to, else the run stops: the data
=====================================  ==============================================

A skip is therefore only ever bad data: never an unreachable server, never the user's code,
never a lost cluster. Failures on a worker found to be a blackhole (every try there failed while
other workers succeed) are not held against the input at all (:class:`Health`).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from facility.data.tokens import TokenError, describe, find_token
from facility.errors import DataError, FacilityError, InfrastructureError, UserCodeError
from facility.processing.plan import endpoint
from facility.processing.receipts import Failure, ReplicaFailure

Action = Literal["retry", "skip", "fail"]


@dataclass(frozen=True)
class Decision:
    action: Action
    error: type[FacilityError] | None = None


RETRY = Decision("retry")
SKIP = Decision("skip")


def decide(failure: Failure, *, attempts: int, retries: int, skip_bad_input: bool,
           damaged_on_workers: int) -> Decision:
    """The next step after ``failure`` on try number ``attempts`` of a chunk or preflight.

    ``damaged_on_workers`` counts the distinct workers that found every replica damaged.
    """
    if failure.kind == "user" or failure.kind == "killed-worker":
        return Decision("fail", UserCodeError)
    if failure.kind == "scheduler-lost":
        return Decision("fail", InfrastructureError)
    if failure.refused:  # another try with the same token is refused the same way
        return Decision("fail", TokenError)
    if failure.every_replica_damaged:
        if damaged_on_workers < 2 and attempts <= retries:
            return RETRY  # confirm from another worker: a broken worker must not condemn a file
        return SKIP if skip_bad_input else Decision("fail", DataError)
    if attempts <= retries:
        return RETRY
    return Decision("fail", InfrastructureError)


# A task costs about 10 ms of CPU beyond its chunks, spread over the client (its receipt and the
# round trip that fetches it), the scheduler and the worker's event loop, all sharing the
# workers' cores on a small cluster (measured on 2 cores, 50k-event chunks, one a task). A task
# carries at least this much work where the queue allows, so that those costs stay a few per
# cent of the run however small its chunks.
MIN_TASK_SECONDS = 0.25
IN_FLIGHT_PER_SLOT = 1.5  # tasks out per slot: one running, and one waiting for half of them


def full_bundle(slots: int, chunk_seconds: float | None, max_tasks_per_second: float,
                limit: int) -> int:
    """How many chunks one task processes, one after another, while the queue is deep.

    Enough that the scheduler starts at most ``max_tasks_per_second`` tasks however many slots
    run (``slots / (chunk_seconds * b)`` tasks a second; until a chunk's time is known, as if
    it were a second), and each task at least ``MIN_TASK_SECONDS`` of work. Every task costs
    the workers, the scheduler and the client.
    """
    seconds = chunk_seconds if chunk_seconds is not None and chunk_seconds > 0 else 1.0
    by_rate = math.ceil(slots / (seconds * max_tasks_per_second))
    by_overhead = math.ceil(MIN_TASK_SECONDS / seconds)
    return max(1, min(limit, max(by_rate, by_overhead)))


def bundle_size(queued: int, slots: int, chunk_seconds: float | None, max_tasks_per_second: float,
                limit: int, wanted: int | None = None) -> int:
    """How many chunks the next task processes: a :func:`full_bundle`, but never more than a
    slot's share of the queue, nor than the queue's share for each of the ``wanted`` tasks the
    client is about to submit when they are more than the slots.

    A bundle larger than a slot's share would be work for one slot while the others run dry:
    the run would end that bundle's extra chunks later than it could. The chunks that bundles
    hand back near the end (see :mod:`.resident`) are spread over the idle slots by the same
    rule.
    """
    share = math.ceil(queued / max(wanted or 0, slots, 1))
    return max(1, min(full_bundle(slots, chunk_seconds, max_tasks_per_second, limit), share))


def in_flight_target(queued: int, slots: int, full: int) -> int:
    """Tasks to keep out: one per slot, and spares (a slot that frees up starts the next
    without waiting for the client) while the queue still holds a full bundle for every slot.

    After that, no spares: the scheduler places a spare behind a busy slot, whichever slot
    frees up first, so near the end a spare would wait there while another slot idles (on two
    slots, one of them processed five of eight chunks and the other three). Every slot that
    frees up then waits one round trip to the client for its next task instead.
    """
    if queued < slots * full:
        return slots
    return math.ceil(IN_FLIGHT_PER_SLOT * slots) + 1


STAGGER = (1.0, 0.6, 1.4, 0.8, 1.2)


def staggered(size: int, task_number: int, first_wave: bool = False) -> int:
    """Bundles of a few different sizes around ``size``: bundles started together then end at
    different times, so the slots they free are refilled in a stream, not in one burst.

    The first wave (no chunk's time known yet) has every size from one to twice ``size``: its
    bundles end in an even stream from the first chunk's time on, so the first results come
    after one chunk and the client is never handed thousands of results at once.
    """
    if first_wave:
        return 1 + task_number % (2 * size - 1)
    return max(1, round(size * STAGGER[task_number % len(STAGGER)]))


@dataclass
class WorkerTally:
    """How one worker's tries went in this run."""

    done: int = 0
    failed: int = 0


def is_blackhole(tally: WorkerTally, threshold: int, others_succeed: bool) -> bool:
    """A worker on which every try failed, ``threshold`` times, while others succeed."""
    return tally.done == 0 and tally.failed >= threshold and others_succeed


Verdict = Literal["counts", "forgiven", "retire"]


class Health:
    """What one run learns, as outcomes come in, about servers, replicas and workers.

    Items (chunks, preflights) are named by a key. A failure on a worker that turns out to be a
    blackhole is *forgiven*: it is not held against the item's input, and the item's tries
    counted by :func:`decide` leave it out.
    """

    def __init__(self, blackhole_failures: int) -> None:
        self.blackhole_failures = blackhole_failures
        self.unhealthy: set[str] = set()  # endpoints whose server did not answer
        self.damaged: set[str] = set()  # replica URLs whose bytes are bad
        self.tallies: defaultdict[str, WorkerTally] = defaultdict(WorkerTally)
        self.retired: dict[str, str] = {}  # worker -> why
        self.replica_failures: dict[str, dict[str, Any]] = {}  # url -> problem, reason, times
        self._failed_on: defaultdict[str, set[str]] = defaultdict(set)
        self._damaged_on: defaultdict[str, set[str]] = defaultdict(set)
        self._forgiven: Counter[str] = Counter()

    def replicas(self, failures: Iterable[ReplicaFailure]) -> None:
        """Servers that did not answer and replicas found damaged are read last from now on."""
        for failure in failures:
            if failure.problem == "unavailable":
                self.unhealthy.add(endpoint(failure.url))
            elif failure.problem == "damaged":
                self.damaged.add(failure.url)
            seen = self.replica_failures.setdefault(
                failure.url, {"problem": failure.problem, "reason": failure.reason, "times": 0})
            seen["times"] += 1

    def succeeded(self, worker: str) -> None:
        self.tallies[worker].done += 1

    def failed(self, key: str, failure: Failure) -> Verdict:
        """Account a failure of item ``key``; says whether it counts against the item, is
        forgiven (its worker is retired), or reveals a blackhole to retire now."""
        self.replicas(failure.replicas)
        worker = failure.worker
        if failure.kind != "input" or worker is None:
            return "counts"
        self._failed_on[key].add(worker)
        tally = self.tallies[worker]
        tally.failed += 1
        if worker in self.retired:
            self._forgiven[key] += 1
            return "forgiven"
        others = any(t.done for name, t in self.tallies.items() if name != worker)
        if is_blackhole(tally, self.blackhole_failures, others):
            self.retired[worker] = (f"all {tally.failed} tries on it failed while other workers "
                                    "read the same inputs")
            self._forgiven[key] += 1
            return "retire"
        if failure.every_replica_damaged:
            self._damaged_on[key].add(worker)
        return "counts"

    def tries(self, key: str, submitted: int) -> int:
        """Tries of an item that count: those submitted, less the forgiven ones."""
        return submitted - self._forgiven[key]

    def damaged_on(self, key: str) -> int:
        """Distinct workers that found every replica of the item damaged."""
        return len(self._damaged_on[key])

    def avoid(self, key: str) -> frozenset[str]:
        """Workers the item's next try should avoid: those it failed on."""
        return frozenset(self._failed_on.get(key, ()))


def bad_input_message(what: str, failure: Failure, skip_hint: bool) -> str:
    lines = [f"cannot read {what}: every replica is damaged or missing"]
    lines += [f"  - {r.describe()}" for r in failure.replicas]
    if skip_hint:
        lines.append("Fix or remove the file in the catalog, or finish without it with "
                     "--skip-bad-input (Python: on_bad_input='skip').")
    return "\n".join(lines)


def refused_message(what: str, failure: Failure) -> str:
    """Which token was presented (as this process finds it; the workers read the same file)
    and each server's answer."""
    lines = [f"cannot read {what}: the data servers refused {describe(find_token())}"]
    lines += [f"  - {r.describe()}" for r in failure.replicas]
    lines.append("Get a current token of your VO (in a notebook the hub renews it; elsewhere "
                 "point BEARER_TOKEN_FILE at one), then run again.")
    return "\n".join(lines)


def unreachable_message(what: str, failure: Failure, attempts: int, resume_hint: str) -> str:
    lines = [f"cannot read {what}: after {attempts} tries no replica's server answered "
             "(this is not a problem of the file)"]
    lines += [f"  - {r.describe()}" for r in failure.replicas]
    lines.append("Check the data servers (`facility status`; `facility up` restarts the "
                 f"embedded ones), then {resume_hint}.")
    return "\n".join(lines)


def user_code_message(failure: Failure) -> str:
    lines = [failure.message]
    if failure.where:
        lines.append(f"  at {failure.where}")
    if failure.traceback:
        lines.append("traceback (most recent call last):")
        lines += ["  " + line for line in failure.traceback.rstrip().splitlines()]
    return "\n".join(lines)


def killed_worker_message(what: str, failure: Failure) -> str:
    """``what``: ``chunk <id>``, or ``the preflight of <file>``."""
    return (f"{what} killed its worker {failure.message}: likely memory; try a smaller "
            "chunk_size (or more memory per worker)")


def scheduler_lost_message(done: int, total: int, resume_hint: str) -> str:
    return (f"the Dask scheduler was lost in the middle of the run ({done} of {total} chunks "
            f"done and kept). Restart the cluster (`facility up`), then {resume_hint}.")
