"""The run's state machine: every chunk settled once, merged, skipped as bad data, or the run
stopped with an error that names who must act.

:class:`Run` sits between the stages: it asks :mod:`.plan` for chunks, hands them to
:mod:`.dispatch`, takes each outcome to :mod:`.policy` when it is a failure, settles it in the
:mod:`.ledger`, merges it in :mod:`.reduce` and makes it durable in the :mod:`.journal`. It
holds what one run learns as it goes: which servers did not answer, which replicas are damaged,
which workers are blackholes.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from coffea.processor import ProcessorABC

from facility.errors import (
    DataError,
    FacilityError,
    InfrastructureError,
    UsageError,
    UserCodeError,
)
from facility.processing import policy
from facility.processing.dispatch import Dispatcher, Item
from facility.processing.journal import Journal, Replay
from facility.processing.ledger import ChunkLedger
from facility.processing.plan import (
    INSPECTIONS,
    Chunk,
    FileInfo,
    FileTask,
    plan_chunks,
    unreachable_endpoints,
)
from facility.processing.receipts import ChunkDone, Failure, Inspected
from facility.processing.reduce import Reducer
from facility.processing.runfolder import RunFolder


class RunError(FacilityError):
    """A run stopped; the message says which input or chunk, whose move it is, and what to do."""


class BadInputError(RunError, DataError):
    """Every replica of an input is damaged or missing, or too much input was skipped."""


class ProcessorError(RunError, UserCodeError):
    """The user's processor raised (``where`` names the place), or its chunks kill workers."""

    def __init__(self, message: str, where: str | None = None) -> None:
        super().__init__(message)
        self.where = where


class RunInterrupted(RunError, InfrastructureError):
    """The scheduler, the cluster or every data server of an input was lost; resume later."""


@dataclass
class Progress:
    """Where a run stands; handed to the progress callback as results come in."""

    chunks_done: int
    chunks_total: int
    events: int
    elapsed: float
    partial: Any = None

    @property
    def events_per_second(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else 0.0


@dataclass(frozen=True)
class RunSettings:
    """The knobs of one run, from the configuration and the call."""

    chunk_size: int
    skip_bad_input: bool
    max_skipped_fraction: float
    retries: int
    checkpoint_seconds: float
    blackhole_failures: int
    open_timeout: int
    open_files: int


@dataclass
class Request:
    """Everything a run needs, whether it starts afresh or resumes."""

    processor: ProcessorABC
    payload: bytes
    datasets: list[str]
    tasks: list[FileTask]
    catalog_events: dict[str, int]
    settings: RunSettings
    folder: RunFolder | None = None
    replay: Replay | None = None


# ---------------------------------------------------------------------------------------------
# the run's state machine


def _key(item: Item) -> str:
    return item.chunk_id if isinstance(item, Chunk) else item.label


def _what(item: Item) -> str:
    if isinstance(item, Chunk):
        return f"{item.file.label} entries {item.entry_start}-{item.entry_stop}"
    return item.label


class Run:
    """Settles every chunk of a run once: merged, skipped as bad input, or the run stops."""

    def __init__(self, request: Request, dispatcher: Callable[[], Dispatcher],
                 journal: Journal | None, progress: Callable[[Progress], None] | None,
                 resume_hint: str) -> None:
        self.request, self.settings = request, request.settings
        self._make_dispatcher = dispatcher
        self._dispatcher: Dispatcher | None = None
        self.journal, self.progress, self.resume_hint = journal, progress, resume_hint
        self.ledger = ChunkLedger()
        self.reducer = Reducer()
        self.health = policy.Health(request.settings.blackhole_failures)
        self.infos: dict[str, FileInfo] = {}
        self.preflights: Counter[str] = Counter()
        self.remembered = 0
        self.replicas_used: Counter[str] = Counter()
        self.columns: set[str] = set()
        self.unsaved: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.next_checkpoint = time.monotonic() + request.settings.checkpoint_seconds

    # -- dispatching ---------------------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        """The cluster is reached only when there is work: a run whose chunks are all in the
        journal writes its outputs without one."""
        if self._dispatcher is None:
            self.health.unhealthy |= unreachable_endpoints(self.request.tasks)
            made = self._make_dispatcher()
            made.ship(self.request.processor)
            self._dispatcher = made
        return self._dispatcher

    def _inspect(self, task: FileTask) -> None:
        dispatcher, health = self.dispatcher, self.health
        self.preflights[task.label] += 1
        dispatcher.inspect(task.ranked(health.unhealthy, health.damaged),
                           frozenset(health.unhealthy), health.avoid(task.label))

    def _submit(self, chunk: Chunk) -> None:
        dispatcher, health = self.dispatcher, self.health
        self.ledger.attempt(chunk.chunk_id)
        dispatcher.process(chunk.ranked(health.unhealthy, health.damaged),
                           frozenset(health.unhealthy), health.avoid(chunk.chunk_id))

    def _again(self, item: Item) -> None:
        if isinstance(item, Chunk):
            self._submit(item)
        else:
            self._inspect(item)

    def _attempts(self, item: Item) -> int:
        submitted = (self.ledger.entries[item.chunk_id].attempts if isinstance(item, Chunk)
                     else self.preflights[item.label])
        return self.health.tries(_key(item), submitted)

    # -- the loop ------------------------------------------------------------------------------

    def execute(self) -> None:
        replayed = self.request.replay
        if replayed is not None and replayed.chunks:
            self.reducer.seed(replayed.accumulator, replayed.chunks)
        for task in self.request.tasks:
            self._start(task)
        if self._dispatcher is not None:
            for batch in self._dispatcher.outcomes():
                for item, outcome in batch:
                    self._settle(item, outcome)
                self._report()
                if time.monotonic() >= self.next_checkpoint:
                    self.checkpoint()
        self.checkpoint()
        self.ledger.check_complete()
        unplanned = self.reducer.chunks - set(self.ledger.entries)
        if unplanned:
            raise UsageError(f"the run's checkpoint holds {len(unplanned)} chunks its plan does "
                             f"not have (first: {min(unplanned)}): was it made with another "
                             "chunk size? Start the run afresh")
        if self.journal is not None:
            self.journal.settled(self.ledger.count("done"), self.ledger.count("skipped"))

    def stop(self) -> None:
        """After a failure: nothing more runs, and what was merged is kept for a resume."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        self.checkpoint()

    def _start(self, task: FileTask) -> None:
        replayed = self.request.replay
        if replayed is not None and task.label in replayed.skipped:
            self.ledger.skip_file(task, replayed.skipped[task.label]["reason"])
        elif replayed is not None and task.label in replayed.inspected:
            record = replayed.inspected[task.label]
            self._plan(FileInfo(task, record["url"], record["entries"], tuple(record["clusters"])),
                       journaled=True)
        elif (known := INSPECTIONS.get(task)) is not None:
            self.remembered += 1
            self._plan(known)
        else:
            self._inspect(task)

    def _plan(self, info: FileInfo, journaled: bool = False, inspected_now: bool = False
              ) -> None:
        """Chunks of an inspected file. When this run's preflight had to pass over nearer
        replicas, its chunks read the replica that answered first; an inspection remembered
        from another run does not say which replicas work now."""
        if self.journal is not None and not journaled:
            self.journal.inspected(info.as_record())
        if inspected_now:
            info = dataclasses.replace(info, task=info.task.preferring(info.url))
        self.infos[info.task.label] = info
        replayed = self.request.replay
        for chunk in plan_chunks(info, self.settings.chunk_size):
            self.ledger.add(chunk)
            cid = chunk.chunk_id
            if cid in self.reducer:
                done = replayed.done.get(cid, {}) if replayed else {}
                self.ledger.settle_done(cid, replica=done.get("replica", "?"), resumed=True,
                                        worker=done.get("worker"), seconds=done.get("seconds", 0))
                self.ledger.entries[cid].attempts = done.get("attempts", 1)
            elif replayed is not None and cid in replayed.skipped:
                self.ledger.settle_skipped(cid, replayed.skipped[cid]["reason"], resumed=True)
            else:
                self._submit(chunk)

    # -- outcomes ------------------------------------------------------------------------------

    def _settle(self, item: Item, outcome: ChunkDone | Inspected | Failure) -> None:
        if isinstance(outcome, Failure):
            self._failed(item, outcome)
            return
        self.health.replicas(outcome.replicas_failed)
        self.health.succeeded(outcome.worker)
        if isinstance(outcome, Inspected):
            INSPECTIONS.remember(outcome.info)
            self._plan(outcome.info, inspected_now=True)
        else:
            self._merge(outcome)

    def _merge(self, done: ChunkDone) -> None:
        entry = self.ledger.entries[done.chunk_id]
        if not self.ledger.settle_done(done.chunk_id, replica=done.replica, worker=done.worker,
                                       seconds=done.seconds):
            return
        self.reducer.add([done.chunk_id], done.output)
        self.unsaved.append({"chunk": done.chunk_id, "replica": done.replica,
                             "worker": done.worker, "seconds": round(done.seconds, 4),
                             "attempts": entry.attempts})
        self.replicas_used[done.replica] += 1
        self.columns.update(done.columns)

    def _failed(self, item: Item, failure: Failure) -> None:
        key = _key(item)
        if isinstance(item, Chunk) and self.ledger.entries[key].state != "pending":
            return  # a late failure of a chunk another try already settled
        verdict = self.health.failed(key, failure)
        if verdict == "retire" and failure.worker is not None:
            self.dispatcher.retire(failure.worker)
        if verdict != "counts":
            self._again(item)
            return
        if isinstance(item, Chunk):
            INSPECTIONS.forget(item.file.label)
        decision = policy.decide(failure, attempts=self._attempts(item),
                                 retries=self.settings.retries,
                                 skip_bad_input=self.settings.skip_bad_input,
                                 damaged_on_workers=self.health.damaged_on(key))
        if decision.action == "retry":
            self._again(item)
        elif decision.action == "skip":
            self._skip(item, failure)
        else:
            raise self._error(decision.error or InfrastructureError, item, failure)

    def _skip(self, item: Item, failure: Failure) -> None:
        reason = failure.describe_replicas()
        if isinstance(item, Chunk):
            self.ledger.settle_skipped(item.chunk_id, reason)
            record = {"chunk": item.chunk_id, "file": item.file.label, "events": item.events,
                      "entries": [item.entry_start, item.entry_stop], "stage": "processing"}
        else:
            INSPECTIONS.forget(item.label)
            self.ledger.skip_file(item, reason)
            record = {"file": item.label, "events": item.catalog_events, "entries": "all",
                      "stage": "preflight"}
        if self.journal is not None:
            self.journal.skipped({**record, "reason": reason})

    def _error(self, kind: type[FacilityError], item: Item, failure: Failure) -> RunError:
        if kind is UserCodeError:
            if failure.kind == "killed-worker":
                what = (f"chunk {item.chunk_id}" if isinstance(item, Chunk)
                        else f"the preflight of {item.label}")
                return ProcessorError(policy.killed_worker_message(what, failure))
            return ProcessorError(policy.user_code_message(failure), failure.where)
        if kind is DataError:
            return BadInputError(policy.bad_input_message(_what(item), failure, skip_hint=True))
        if failure.kind == "scheduler-lost":
            return RunInterrupted(policy.scheduler_lost_message(
                self.ledger.count("done"), len(self.ledger.entries), self.resume_hint))
        return RunInterrupted(policy.unreachable_message(_what(item), failure,
                                                         self._attempts(item), self.resume_hint))

    # -- durability and progress ---------------------------------------------------------------

    def checkpoint(self) -> None:
        """Make what is merged durable (only when something changed since the last time).

        The next one is due after ``checkpoint_seconds``, or after ten times what this one
        took, whichever is longer: a large accumulator never costs more than a tenth of the run.
        """
        if self.journal is None or not self.unsaved:
            return
        began = time.monotonic()
        self.journal.checkpoint(self.reducer.accumulator, self.reducer.chunks, self.unsaved)
        self.unsaved = []
        took = time.monotonic() - began
        self.next_checkpoint = began + took + max(self.settings.checkpoint_seconds, 10 * took)

    def _report(self) -> None:
        if self.progress is None:
            return
        settled = self.ledger.count("done") + self.ledger.count("skipped")
        self.progress(Progress(settled, len(self.ledger.entries), self.ledger.events("done"),
                               time.perf_counter() - self.started, self.reducer.accumulator))
