"""The run's state machine: every chunk settled once, merged, skipped as bad data, or the run
stopped with an error that names who must act.

:class:`Run` sits between the stages: it asks :mod:`.plan` for chunks and queues them, hands
them to :mod:`.dispatch` in bundles sized by :func:`.policy.bundle_size`, takes each failure to
:mod:`.policy`, settles each receipt in the :mod:`.ledger`, collects the workers' accumulators
into :mod:`.reduce` and makes them durable in the :mod:`.journal`. It holds what one run learns
as it goes: which servers did not answer, which replicas are damaged, which workers are
blackholes, how long a chunk takes.

The client's work per chunk is a receipt: a few ledger fields. Results arrive one accumulator
per worker per collection, so the client's time and memory do not grow with the number of
chunks (the ledger, a few hundred bytes a chunk, aside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from coffea.processor import ProcessorABC

from facility.data.tokens import TokenError
from facility.errors import (
    DataError,
    FacilityError,
    InfrastructureError,
    UsageError,
    UserCodeError,
)
from facility.processing import policy
from facility.processing.dispatch import Dispatcher, Item, SchedulerLost
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
from facility.processing.receipts import BundleDone, ChunkDone, Failure, Inspected, Receipt
from facility.processing.reduce import Holdings, Reducer
from facility.processing.resident import Held
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


class AccessRefused(RunError, TokenError):
    """The data servers refused the user's token; the message names the token and why."""


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
    max_tasks_per_second: float = 100.0
    bundle_limit: int = 64


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
    inspected: dict[str, FileInfo] = field(default_factory=dict)  # files known without preflight


# ---------------------------------------------------------------------------------------------
# the run's state machine

SINGLE_ITEM = 1
CHUNK_TIME_WEIGHT = 0.1  # of each new chunk time in the running estimate
MIN_YIELD_SECONDS = 1.0


@contextlib.contextmanager
def _long_lived() -> Iterator[None]:
    """Make what lives as long as the run (a chunk and a ledger entry for every chunk of the
    plan: hundreds of thousands in a large run) out of the cycle collector's sight.

    Otherwise the collector walks them all, again and again while they are made and while the
    run goes on, each time stopping the client, and with it the fetching of results, for tenths
    of a second. They are made with it paused and then set aside from its walks
    (:func:`gc.freeze`) until the run ends (:func:`gc.unfreeze`, in :meth:`Run.execute`).
    """
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if paused:
            gc.enable()


def _what(chunk: Chunk) -> str:
    return f"{chunk.file.label} entries {chunk.entry_start}-{chunk.entry_stop}"


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
        self.holdings = Holdings()
        self.health = policy.Health(request.settings.blackhole_failures)
        self.queue: deque[Chunk] = deque()
        self.solo: set[str] = set()  # chunks to be tried alone (their bundle killed workers)
        # chunks whose worker died under them; each is tried with nothing else in flight
        self.suspects: deque[Chunk] = deque()
        self.isolated: str | None = None  # the suspect being tried so
        self.last_yield = -math.inf  # when bundles were last asked to hand back chunks
        self.infos: dict[str, FileInfo] = {}
        self.preflights: Counter[str] = Counter()
        self.remembered = 0
        self.stats = RunStats()
        self.unsaved: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.next_checkpoint = time.monotonic() + request.settings.checkpoint_seconds
        self.next_report = 0.0

    # -- dispatching ---------------------------------------------------------------------------

    @property
    def dispatcher(self) -> Dispatcher:
        """The cluster is reached only when there is work: a run whose chunks are all in the
        journal writes its outputs without one."""
        if self._dispatcher is None:
            self.health.unhealthy |= unreachable_endpoints(self.request.tasks)
            made = self._make_dispatcher()
            made.ship(self.request.payload)
            self._dispatcher = made
        return self._dispatcher

    def _inspect(self, task: FileTask) -> None:
        dispatcher, health = self.dispatcher, self.health
        self.preflights[task.label] += 1
        dispatcher.inspect(task.ranked(health.unhealthy, health.damaged),
                           frozenset(health.unhealthy), health.avoid(task.label))

    def _submit(self, chunks: list[Chunk], avoid_workers: frozenset[str] = frozenset()) -> None:
        dispatcher, health = self.dispatcher, self.health
        for chunk in chunks:
            self.ledger.attempt(chunk.chunk_id)
        self.stats.tasks += 1
        dispatcher.process(tuple(c.ranked(health.unhealthy, health.damaged) for c in chunks),
                           frozenset(health.unhealthy), avoid_workers)

    def _top_up(self) -> None:
        """Keep every slot busy: submit bundles from the queue until about one and a half tasks
        per slot are out (a bundle is many seconds of work: one each, and a few to spare), and
        near the end one per slot (:func:`.policy.in_flight_target`). A chunk tried before
        goes alone, to another worker if it can."""
        if self.suspects or self.isolated:
            self._try_suspect()
            return
        if not self.queue:
            return
        dispatcher = self.dispatcher
        slots = dispatcher.slots()
        target = self._in_flight_target(slots)
        while self.queue and dispatcher.in_flight < target:
            if self._alone(self.queue[0]):
                chunk = self.queue.popleft()
                self._submit([chunk], self.health.avoid(chunk.chunk_id))
                continue
            size = min(self.settings.bundle_limit, policy.staggered(policy.bundle_size(
                len(self.queue), slots, self.stats.chunk_seconds,
                self.settings.max_tasks_per_second, self.settings.bundle_limit,
                target - dispatcher.in_flight),
                self.stats.tasks, first_wave=self.stats.chunk_seconds is None))
            bundle: list[Chunk] = []
            while self.queue and len(bundle) < size and not self._alone(self.queue[0]):
                bundle.append(self.queue.popleft())
            self._submit(bundle)
        dispatcher.flush()

    def _in_flight_target(self, slots: int) -> int:
        full = policy.full_bundle(slots, self.stats.chunk_seconds,
                                  self.settings.max_tasks_per_second, self.settings.bundle_limit)
        return policy.in_flight_target(len(self.queue), slots, full)

    def _try_suspect(self) -> None:
        """Once nothing else is in flight, try the next suspect: alone in the whole run, a
        chunk that kills its worker again is the one to blame."""
        dispatcher = self.dispatcher
        if dispatcher.in_flight:
            return
        self.isolated = None  # the last suspect's try succeeded (a failure ended the run)
        if self.suspects:
            chunk = self.suspects.popleft()
            self.isolated = chunk.chunk_id
            self._submit([chunk])
            dispatcher.flush()

    def _spread_the_tail(self) -> None:
        """The queue is empty, slots idle and bundles still hold chunks they have not started:
        ask those holding more than a slot's share of what is left (about half of what is in
        flight is not started yet) to hand the rest back, to spread it over the idle slots.
        Asked again at most once per chunk time (by then the last answers are in, and bundles
        are smaller)."""
        dispatcher = self._dispatcher
        if (self.queue or dispatcher is None
                or dispatcher.chunks_in_flight <= dispatcher.in_flight
                or dispatcher.in_flight >= dispatcher.slots()
                or time.monotonic() - self.last_yield < max(MIN_YIELD_SECONDS,
                                                            self.stats.chunk_seconds or 0.0)):
            return
        self.last_yield = time.monotonic()
        dispatcher.yield_chunks(keep=dispatcher.chunks_in_flight // (2 * dispatcher.slots()))

    def _alone(self, chunk: Chunk) -> bool:
        """A chunk tried before (or whose bundle killed workers) shares a task with no other."""
        return (chunk.chunk_id in self.solo or self.ledger.entries[chunk.chunk_id].attempts > 0
                or bool(self.health.avoid(chunk.chunk_id)))

    def _again(self, item: Chunk | FileTask, first: bool = True) -> None:
        """Try an item again: a preflight at once, a chunk at the head of the queue."""
        if isinstance(item, FileTask):
            self._inspect(item)
        elif first:
            self.queue.appendleft(item)
        else:
            self.queue.append(item)

    def _attempts(self, item: Chunk | FileTask) -> int:
        key = item.chunk_id if isinstance(item, Chunk) else item.label
        submitted = (self.ledger.entries[key].attempts if isinstance(item, Chunk)
                     else self.preflights[key])
        return self.health.tries(key, submitted)

    # -- the loop ------------------------------------------------------------------------------

    def execute(self) -> None:
        replayed = self.request.replay
        if replayed is not None and replayed.chunks:
            self.reducer.seed(replayed.accumulator, replayed.chunks)
        try:
            with _long_lived():
                for task in self.request.tasks:
                    self._start(task)
                    if self.queue and self._dispatcher is None:
                        _ = self.dispatcher  # there is work: the processor travels meanwhile
            self._loop()
        finally:
            gc.unfreeze()

    def _loop(self) -> None:
        self._top_up()
        while self._dispatcher is not None and (self._dispatcher.in_flight or self.queue
                                                or self.suspects or len(self.holdings)):
            dispatcher = self._dispatcher
            for item, outcome in dispatcher.outcomes(wait=self._until_next_collection()):
                self._settle(item, outcome)
            if time.monotonic() >= self.next_checkpoint or not (dispatcher.in_flight
                                                                or self.queue):
                self._collect_and_checkpoint()
            self._top_up()
            self._spread_the_tail()
            self._report()
        self.checkpoint()
        self._report(final=True)
        self.ledger.check_complete()
        unplanned = self.reducer.chunks - set(self.ledger.entries)
        if unplanned:
            raise UsageError(f"the run's checkpoint holds {len(unplanned)} chunks its plan does "
                             f"not have (first: {min(unplanned)}): was it made with another "
                             "chunk size? Start the run afresh")
        if self.journal is not None:
            self.journal.settled(self.ledger.count("done"), self.ledger.count("skipped"))
        if self._dispatcher is not None:
            self._dispatcher.finish()

    def _until_next_collection(self) -> float:
        return max(0.0, min(self.next_checkpoint - time.monotonic(), REPORT_SECONDS))

    def stop(self) -> None:
        """After a failure: nothing more runs, and what was merged is kept for a resume."""
        if self._dispatcher is not None:
            with contextlib.suppress(Exception):  # the scheduler may be what failed
                self._collect()
            self._dispatcher.cancel()
        self.checkpoint()

    def _start(self, task: FileTask) -> None:
        replayed = self.request.replay
        known = self.request.inspected.get(task.label)
        if replayed is not None and task.label in replayed.skipped:
            self.ledger.skip_file(task, replayed.skipped[task.label]["reason"])
        elif replayed is not None and task.label in replayed.inspected:
            record = replayed.inspected[task.label]
            self._plan(FileInfo(task, record["url"], record["entries"], tuple(record["clusters"])),
                       journaled=True)
        elif known is not None:
            self._plan(known)
        elif (remembered := INSPECTIONS.get(task)) is not None:
            self.remembered += 1
            self._plan(remembered)
        else:
            self._inspect(task)

    def _plan(self, info: FileInfo, journaled: bool = False, inspected_now: bool = False
              ) -> None:
        """Queue the chunks of an inspected file. When this run's preflight had to pass over
        nearer replicas, its chunks read the replica that answered first; an inspection
        remembered from another run does not say which replicas work now."""
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
                self.queue.append(chunk)

    # -- outcomes ------------------------------------------------------------------------------

    def _settle(self, item: Item, outcome: Receipt | Failure) -> None:
        if isinstance(item, FileTask):
            if isinstance(outcome, Inspected):
                self.health.replicas(outcome.replicas_failed)
                self.health.succeeded(outcome.worker)
                INSPECTIONS.remember(outcome.info)
                self._plan(outcome.info, inspected_now=True)
            elif isinstance(outcome, Failure):
                self._failed(item, outcome)
            return
        if isinstance(outcome, BundleDone):
            self._bundle_done(item, outcome)
        elif isinstance(outcome, Failure):
            self._bundle_failed(item, outcome)

    def _bundle_done(self, chunks: tuple[Chunk, ...], bundle: BundleDone) -> None:
        by_id = {c.chunk_id: c for c in chunks}
        for done in bundle.done:
            self.health.replicas(done.replicas_failed)
            self.health.succeeded(done.worker)
            self.stats.chunk_done(done)
            if not bundle.absorbed:
                self._redo(by_id[done.chunk_id])  # the worker refused it: it held one already
            elif self.ledger.hold(done.chunk_id, replica=done.replica, worker=done.worker,
                                  seconds=done.seconds) and not self.holdings.hold(
                                      bundle.holder, done.chunk_id):
                self._redo(by_id[done.chunk_id])  # held by a worker the run has lost
        for chunk_id, failure in bundle.failures:
            self._failed(by_id[chunk_id], failure)
        for chunk_id in bundle.unattempted:
            self._redo(by_id[chunk_id])

    def _redo(self, chunk: Chunk, into: deque[Chunk] | None = None) -> None:
        """A chunk processed, or lost, not through its own fault: queue it afresh (or ``into``
        another line), and this try does not count against it."""
        entry = self.ledger.entries[chunk.chunk_id]
        if entry.state == "held":
            self.ledger.unhold(chunk.chunk_id)
        if entry.state == "pending":
            entry.attempts = max(0, entry.attempts - 1)
            (self.queue if into is None else into).append(chunk)

    def _bundle_failed(self, chunks: tuple[Chunk, ...], failure: Failure) -> None:
        """The whole task failed (Dask's failures). A bundle that killed its workers is split:
        its chunks are tried alone, so that the one to blame is found and named. A worker that
        dies takes every task it was given with it, those still waiting included, so a chunk
        tried alone is blamed only once it killed its worker with nothing else in flight."""
        if failure.kind == "killed-worker" and len(chunks) > 1:
            for chunk in chunks:
                self.solo.add(chunk.chunk_id)
                self._redo(chunk)
            return
        if failure.kind == "killed-worker" and chunks[0].chunk_id != self.isolated:
            self._redo(chunks[0], into=self.suspects)
            return
        for chunk in chunks:
            self._failed(chunk, failure)

    def _failed(self, item: Chunk | FileTask, failure: Failure) -> None:
        key = item.chunk_id if isinstance(item, Chunk) else item.label
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

    def _skip(self, item: Chunk | FileTask, failure: Failure) -> None:
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

    def _error(self, kind: type[FacilityError], item: Chunk | FileTask, failure: Failure
               ) -> RunError:
        what = _what(item) if isinstance(item, Chunk) else item.label
        if kind is UserCodeError:
            if failure.kind == "killed-worker":
                subject = (f"chunk {item.chunk_id}" if isinstance(item, Chunk)
                           else f"the preflight of {item.label}")
                return ProcessorError(policy.killed_worker_message(subject, failure))
            return ProcessorError(policy.user_code_message(failure), failure.where)
        if kind is DataError:
            return BadInputError(policy.bad_input_message(what, failure, skip_hint=True))
        if kind is TokenError:
            return AccessRefused(policy.refused_message(what, failure))
        if failure.kind == "scheduler-lost":
            return RunInterrupted(policy.scheduler_lost_message(
                self.ledger.count("done"), len(self.ledger.entries), self.resume_hint))
        return RunInterrupted(policy.unreachable_message(what, failure, self._attempts(item),
                                                         self.resume_hint))

    # -- collecting the workers' accumulators --------------------------------------------------

    def _collect(self) -> None:
        """Fetch every worker's accumulator and merge it. Chunks held by a worker that did not
        answer, or that it did not hand over, are done again; a worker once lost stays lost."""
        if self._dispatcher is None or not (len(self.holdings) or (
                self._dispatcher.in_flight and self.stats.chunk_seconds is not None)):
            return  # nothing can be held yet: no chunk has been processed
        try:
            answers = self._dispatcher.collect()
        except SchedulerLost as lost:
            raise RunInterrupted(policy.scheduler_lost_message(
                self.ledger.count("done"), len(self.ledger.entries), self.resume_hint)) from lost
        for held in answers:
            expected = self.holdings.held_by(held.holder)
            self._merge(held)
            self._redo_all(self.holdings.take(held.holder, expected - held.chunks))
        for holder in self.holdings.holders() - {held.holder for held in answers}:
            self._redo_all(self.holdings.lose(holder))

    def _redo_all(self, chunk_ids: set[str]) -> None:
        for chunk_id in sorted(chunk_ids):
            self._redo(self.ledger.entries[chunk_id].chunk)

    def _merge(self, held: Held) -> None:
        if held.holder in self.holdings.lost or not held.chunks:
            return  # a lost worker's chunks were queued again when it was lost
        self.holdings.take(held.holder, held.chunks)
        if any(self.ledger.entries[c].state == "done" for c in held.chunks):
            self._redo_all(set(held.chunks))  # some ran elsewhere as well: drop it, redo the rest
            return
        self.reducer.add(held.chunks, held.output)
        self.stats.merged()
        for chunk_id in held.chunks:
            entry = self.ledger.entries[chunk_id]
            self.ledger.settle_done(chunk_id)
            self.unsaved.append({"chunk": chunk_id, "replica": entry.replica,
                                 "worker": entry.worker, "seconds": entry.seconds,
                                 "attempts": entry.attempts})

    # -- durability and progress ---------------------------------------------------------------

    def _collect_and_checkpoint(self) -> None:
        """Collect the workers' partials and make the result durable.

        The next time is due after ``checkpoint_seconds``, or after ten times what this one
        took, whichever is longer: the client waits on a collection (thousands of busy workers
        answer slowly) and a large accumulator takes time to write, and neither ever costs
        more than a tenth of the run.
        """
        began = time.monotonic()
        self._collect()
        self.checkpoint()
        took = time.monotonic() - began
        self.next_checkpoint = began + took + max(self.settings.checkpoint_seconds, 10 * took)

    def checkpoint(self) -> None:
        """Make what is merged durable (only when something changed since the last time)."""
        if self.journal is None or not self.unsaved:
            return
        self.journal.checkpoint(self.reducer.accumulator, self.reducer.chunks, self.unsaved)
        self.unsaved = []

    def _report(self, final: bool = False) -> None:
        """Progress, a few times a second at most, with the result merged so far."""
        now = time.monotonic()
        if self.progress is None or (now < self.next_report and not final):
            return
        self.next_report = now + 1 / REPORTS_PER_SECOND
        ledger = self.ledger
        settled = ledger.count("done") + ledger.count("held") + ledger.count("skipped")
        self.progress(Progress(settled, len(ledger.entries),
                               ledger.events("done") + ledger.events("held"),
                               time.perf_counter() - self.started, self.reducer.accumulator))


REPORT_SECONDS = 0.25
REPORTS_PER_SECOND = 4


@dataclass
class RunStats:
    """What the summary reports beyond the ledger, gathered as receipts arrive."""

    replicas_used: Counter[str] = field(default_factory=Counter)
    columns: set[str] = field(default_factory=set)
    chunk_seconds: float | None = None  # running estimate, for bundle sizes
    busy_seconds: float = 0.0
    collections: int = 0
    tasks: int = 0  # chunk tasks submitted (a bundle is one)
    first_merge: float | None = None
    began: float = field(default_factory=time.perf_counter)

    def chunk_done(self, done: ChunkDone) -> None:
        self.replicas_used[done.replica] += 1
        self.columns.update(done.columns)
        self.busy_seconds += done.seconds
        self.chunk_seconds = done.seconds if self.chunk_seconds is None else (
            (1 - CHUNK_TIME_WEIGHT) * self.chunk_seconds + CHUNK_TIME_WEIGHT * done.seconds)

    def merged(self) -> None:
        self.collections += 1
        if self.first_merge is None:
            self.first_merge = time.perf_counter() - self.began
