"""Dispatch: the run's only door to the Dask cluster.

It ships the processor once as a task (not a scattered object: if every worker dies, the
scheduler recomputes a task, while scattered data is simply gone and every chunk that needed it
would be lost), submits preflights and *bundles* of chunks, and hands back what finished in
batches, each result already a receipt or a :class:`~facility.processing.receipts.Failure`.

A bundle is processed on one worker thread, chunk after chunk, each merged into the worker's
own accumulator for the run (:mod:`.resident`); only small receipts come back. Bundles keep the
scheduler's task rate bounded however many cores run (one task per chunk would make the
scheduler the limit at about a thousand cores), and :meth:`Dispatcher.collect` fetches the
workers' accumulators, one per worker, about once per checkpoint. Dask's own failures are
translated here: a task that killed every worker it ran on, a scheduler that went away, a
processor that cannot be loaded on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import cloudpickle
from distributed import Client, Future, as_completed, get_worker
from distributed.scheduler import KilledWorker

from facility.errors import UserCodeError
from facility.processing import resident
from facility.processing.plan import Chunk, FileTask
from facility.processing.reader import (
    inspect_file,
    process_chunk,
    processor_key,
    users_own_file,
)
from facility.processing.receipts import BundleDone, ChunkDone, Failure, Receipt, short

Item = tuple[Chunk, ...] | FileTask  # a bundle of chunks, or a file's preflight
Outcome = Receipt | Failure

LOST_POLL_SECONDS = 0.25
SLOTS_REFRESH_SECONDS = 2.0
PROCESSOR_WAIT_SECONDS = 10.0
GATHER_BATCH = 500


def dask_setup(server: Any) -> None:
    """Run by each worker and scheduler that preloads this module, once its imports are done:
    the objects they made (coffea, awkward, uproot, distributed; a few hundred thousand) are
    moved out of the cycle collector's sight for good. Every chunk makes thousands of
    containers, so the collector runs often, and each full pass would walk all of them again
    (measured: a 50k-event chunk about a tenth slower with them in view)."""
    gc.collect()
    gc.freeze()


def _own_module(name: str) -> bool:
    """A module of the user's (beside their notebook), which workers cannot import by name."""
    path = getattr(sys.modules.get(name), "__file__", None)
    return name != "__main__" and path is not None and users_own_file(path)


def processor_payload(processor: Any) -> bytes:
    """The processor as bytes. Everything it uses from the user's own modules (beside their
    notebook, which workers cannot import: the processor's module, a helpers module it
    imports, a schema class of its own) travels by value."""
    for name in [n for n in list(sys.modules) if _own_module(n)]:
        cloudpickle.register_pickle_by_value(sys.modules[name])
    try:
        return cloudpickle.dumps(processor)
    except Exception as exc:
        raise UserCodeError(f"the processor {processor_key(processor)} cannot be sent to the "
                            f"workers: {short(exc)}") from exc


def _load_processor(payload: bytes) -> Any:
    return cloudpickle.loads(payload)


def _holds(processor: Any) -> None:
    """Nothing: running it makes its worker fetch the processor."""


def _worker_name() -> str:
    try:
        return str(get_worker().address)
    except ValueError:
        return f"pid {os.getpid()}"


def _stamped(outcome: Outcome) -> Outcome:
    return dataclasses.replace(outcome, worker=_worker_name())


def _inspect_task(task: FileTask, timeout: int, avoid: frozenset[str]) -> Outcome:
    return _stamped(inspect_file(task, timeout, avoid))


ChunkWork = Callable[..., ChunkDone | Failure]


def _bundle_task(chunks: tuple[Chunk, ...], processor: Any, run_id: str, epoch: int,
                 timeout: int, open_limit: int, avoid: frozenset[str],
                 work: ChunkWork = process_chunk) -> BundleDone:
    """Process chunks one after another on this worker thread, each merged at once into this
    worker's accumulator for the run, and hand back receipts. ``work`` processes one chunk
    (the scale emulation passes its own)."""
    worker = _worker_name()
    holder = resident.holder_name(worker)
    done: list[ChunkDone] = []
    failures: list[tuple[str, Failure]] = []
    refused = False
    for index, chunk in enumerate(chunks):
        if index and resident.should_yield(run_id, epoch, len(chunks) - index):
            return BundleDone(holder, tuple(done), tuple(failures),
                              tuple(c.chunk_id for c in chunks[index:]), not refused, worker)
        outcome = work(processor, chunk, timeout, open_limit, avoid)
        if isinstance(outcome, Failure):
            failures.append((chunk.chunk_id, dataclasses.replace(outcome, worker=worker)))
            if outcome.kind == "user":  # the run stops: the rest is not worth reading
                return BundleDone(holder, tuple(done), tuple(failures),
                                  tuple(c.chunk_id for c in chunks[index + 1:]), not refused,
                                  worker)
            continue
        refused |= not resident.absorb(run_id, [chunk.chunk_id], outcome.output)
        done.append(dataclasses.replace(outcome, output=None, worker=worker))
    return BundleDone(holder, tuple(done), tuple(failures), (), not refused, worker)


class SchedulerLost(ConnectionError):
    """The client lost its scheduler while fetching results."""


async def _unless_lost(client: Client, awaitable: Any) -> Any:
    """Await a call to the scheduler; give up as soon as the client loses its scheduler,
    instead of waiting out the reconnection timeout."""
    pending = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait([pending], timeout=LOST_POLL_SECONDS)
        if done:
            return pending.result()
        if client.status != "running":
            pending.cancel()
            raise SchedulerLost(f"the client lost the scheduler ({client.status})")


async def _gather_unless_lost(client: Client, futures: list[Future]) -> list[Any]:
    """The results of finished futures, in one round trip."""
    if not futures:
        return []
    return list(await _unless_lost(client, client.gather(futures, asynchronous=True)))


async def _run_unless_lost(client: Client, function: Callable[..., Any], *args: Any) -> Any:
    return await _unless_lost(client, client.run(function, *args, on_error="return",
                                                 asynchronous=True))


def _killed_worker(exc: BaseException) -> Failure:
    times = re.search(r"on (\d+) different workers", str(exc))
    return Failure("killed-worker", message=f"{times.group(1)} times" if times else "repeatedly")


def close_client(client: Client) -> None:
    """Close a client; one that lost its scheduler is closed without Dask logging, as errors,
    the reconnection this interrupts (the run has said what happened)."""
    if client.status == "running":
        client.close()
        return
    quiet = logging.getLogger("distributed.client")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        client.close(timeout=5)
    finally:
        quiet.setLevel(level)


SUBMIT_BATCH = 250  # tasks per message: workers start on the first while the scheduler reads on


class Dispatcher:
    """Submits a run's tasks and yields their outcomes as they finish."""

    def __init__(self, client: Client, run_id: str, timeout: int, open_limit: int,
                 work: ChunkWork = process_chunk) -> None:
        self.client, self.run_id = client, run_id
        self.timeout, self.open_limit, self.work = timeout, open_limit, work
        self.pending = as_completed(loop=client.loop)
        self.items: dict[Any, Item] = {}  # by task key
        self.processor: Future | None = None
        self._numbers = itertools.count()
        self._slots = (0, -1.0)  # (threads, when counted)
        self.yields = 0  # bundles submitted from now on belong to this yield epoch
        self._unsent: dict[frozenset[str], list[tuple[str, tuple[Chunk, ...]]]] = {}
        self._finished: list[Future] = []  # finished, not fetched yet
        self._pulls: list[Future] = []  # workers fetching the processor (see :meth:`ship`)

    def ship(self, payload: bytes) -> None:
        """Send the processor (:func:`processor_payload`) once; every chunk task depends on it.
        It is sent at once and waited for only when the first bundle goes: the run plans its
        chunks meanwhile."""
        self.processor = self.client.submit(_load_processor, payload,
                                            key=f"processor-{self.run_id}", pure=False)
        self._pulls = self._everywhere(self.processor)

    def _everywhere(self, future: Future) -> list[Future]:
        """Have every worker there is now fetch a result before the first bundle needs it.

        Otherwise every worker fetches it from the one that made it just when that one starts
        its first hundreds of tasks, and waits seconds for an answer. A small task pinned to
        each worker pulls it (:meth:`_await_pulls` waits for them). Still a task's result, not
        scattered data: if every worker holding it dies, it is made again.
        """
        workers = list(self.client.scheduler_info(n_workers=-1)["workers"])
        # none: an adaptive cluster starting from zero, whose workers fetch it when they come
        return [self.client.submit(_holds, future, key=f"{future.key}-copy-{index}",
                                   workers=[worker], allow_other_workers=False, pure=False,
                                   priority=20)
                for index, worker in enumerate(workers)]

    def _await_pulls(self) -> None:
        """Wait a bounded time, never more, for every worker to hold the processor (a worker
        lost meanwhile fetches it later, as does one that joins later)."""
        pulls, self._pulls = self._pulls, []
        if pulls and self.processor is not None:
            # a processor that fails to load fails every pull, which ends the wait at once
            with contextlib.suppress(Exception):  # a timeout, or a scheduler gone: bundles say
                for _ in as_completed(pulls, loop=self.client.loop,
                                      timeout=PROCESSOR_WAIT_SECONDS):
                    pass
        for pull in pulls:  # a processor that failed to load is reported by the bundles
            pull.release()

    def _key(self, kind: str) -> str:
        return f"{kind}-{self.run_id}-{next(self._numbers)}"

    def slots(self) -> int:
        """Worker threads in the cluster now (asked at most every few seconds)."""
        if time.monotonic() - self._slots[1] > SLOTS_REFRESH_SECONDS:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
            self._slots = (sum(w.get("nthreads", 1) for w in workers), time.monotonic())
        return max(self._slots[0], 1)

    def _placement(self, avoid_workers: frozenset[str]) -> dict[str, Any]:
        """A retry prefers workers other than those it failed on, when there are any (a soft
        restriction: with no other worker it still runs)."""
        if not avoid_workers:
            return {}
        workers = set(self.client.scheduler_info(n_workers=-1)["workers"])
        allowed = sorted(workers - avoid_workers)
        return {"workers": allowed, "allow_other_workers": True} if allowed else {}

    def inspect(self, task: FileTask, avoid: frozenset[str],
                avoid_workers: frozenset[str] = frozenset()) -> None:
        key = self._key("preflight")
        self.items[key] = task
        self.pending.add(self.client.submit(_inspect_task, task, self.timeout, avoid, key=key,
                                            pure=False, priority=10,
                                            **self._placement(avoid_workers)))

    def process(self, chunks: tuple[Chunk, ...], avoid: frozenset[str],
                avoid_workers: frozenset[str] = frozenset()) -> None:
        """Queue a bundle of chunks for the next :meth:`flush` (retries and tries elsewhere
        come as bundles of one, submitted at once)."""
        key = self._key("bundle")
        self.items[key] = chunks
        if avoid_workers:
            self._await_pulls()
            self.pending.add(self.client.submit(
                _bundle_task, chunks, key=key, pure=False, priority=5,
                **self._bundle_arguments(avoid), **self._placement(avoid_workers)))
        else:
            self._unsent.setdefault(avoid, []).append((key, chunks))

    def _bundle_arguments(self, avoid: frozenset[str]) -> dict[str, Any]:
        return {"processor": self.processor, "run_id": self.run_id, "epoch": self.yields,
                "timeout": self.timeout, "open_limit": self.open_limit, "avoid": avoid,
                "work": self.work}

    def flush(self) -> None:
        """Submit every queued bundle, in one message to the scheduler per set of endpoints to
        avoid: submitting thousands of tasks one by one costs the client seconds."""
        if self._unsent:
            self._await_pulls()
        for avoid, bundles in self._unsent.items():
            for first in range(0, len(bundles), SUBMIT_BATCH):
                batch = bundles[first:first + SUBMIT_BATCH]
                self.pending.update(self.client.map(
                    _bundle_task, [chunks for _, chunks in batch], key=[k for k, _ in batch],
                    pure=False, **self._bundle_arguments(avoid)))
        self._unsent.clear()

    @property
    def in_flight(self) -> int:
        return len(self.items)

    @property
    def chunks_in_flight(self) -> int:
        return sum(len(item) for item in self.items.values() if isinstance(item, tuple))

    def outcomes(self, wait: float) -> list[tuple[Item, Outcome]]:
        """What finished since the last call, waiting up to ``wait`` seconds for something;
        one round trip fetches a batch of results. A batch is at most ``GATHER_BATCH`` tasks:
        the engine settles them and refills their slots before it fetches the next."""
        self.flush()
        deadline = time.monotonic() + wait
        while True:
            self._finished.extend(self.pending.next_batch(block=False))
            if self._finished or time.monotonic() >= deadline or not self.items:
                batch = self._finished[:GATHER_BATCH]
                del self._finished[:GATHER_BATCH]
                return self._collect(batch)
            self._sleep_until_one_finishes(deadline - time.monotonic())

    def _sleep_until_one_finishes(self, seconds: float) -> None:
        """Sleep until a task finishes or ``seconds`` pass. ``as_completed`` wakes its
        condition after queueing each finished future, so checking the queue under the
        condition's lock cannot miss one: no polling delay between a task's end and its
        receipt (the first chunks of a run start sooner; the tail is settled at once)."""
        condition = self.pending.thread_condition
        with condition:
            if self.pending.queue.empty():
                condition.wait(timeout=max(seconds, 0.0))

    def _collect(self, batch: list[Future]) -> list[tuple[Item, Outcome]]:
        finished = [f for f in batch if f.status == "finished"]
        results: dict[Any, Outcome] = {}
        try:
            gathered = self.client.sync(_gather_unless_lost, self.client, finished)
            results.update(zip((f.key for f in finished), gathered, strict=True))
        except Exception as exc:  # noqa: BLE001 (any failure to fetch: the scheduler went away)
            lost = Failure("scheduler-lost", message=short(exc))
            results.update((f.key, lost) for f in finished)
        collected = []
        for future in batch:
            if future.key not in results and future.status in ("pending", "lost"):
                self.pending.add(future)  # its worker died holding the result: Dask computes it
                continue                  # again, and it comes back finished
            outcome = results.get(future.key) or self._failure(future)
            collected.append((self.items.pop(future.key), outcome))
            future.release()
        return collected

    def _failure(self, future: Future) -> Failure:
        if future.status == "cancelled":
            return Failure("scheduler-lost", message="the task was cancelled: the client lost "
                                                     "its scheduler")
        try:
            exc = future.exception()
        except Exception as lost:  # noqa: BLE001 (the scheduler went away while asking)
            return Failure("scheduler-lost", message=short(lost))
        if isinstance(exc, KilledWorker):
            return _killed_worker(exc)
        if self.processor is not None and self.processor.status == "error":
            return Failure("user", message="the processor could not be loaded on the workers: "
                                           f"{short(exc)}")
        if exc is None:
            return Failure("scheduler-lost", message="the task's result was lost")
        raise exc  # the facility's own worker code failed: a bug, with its traceback

    def collect(self) -> list[resident.Held]:
        """Every worker's accumulator for the run, handed over and started afresh. A worker
        missing from the answer (dead, or not answering) holds nothing that counts any more."""
        if self.client.status != "running":
            raise SchedulerLost(f"the client lost the scheduler ({self.client.status})")
        try:
            answers = self.client.sync(_run_unless_lost, self.client, resident.collect,
                                       self.run_id)
        except Exception as exc:
            raise SchedulerLost(f"collecting the workers' results failed: {short(exc)}") from exc
        return [held for held in answers.values() if isinstance(held, resident.Held)]

    def yield_chunks(self, keep: int = 0) -> None:
        """Ask every bundle of the run submitted so far to hand back the chunks it has not
        started beyond ``keep``."""
        self.flush()
        if self.client.status == "running":
            self.client.sync(_run_unless_lost, self.client, resident.yield_chunks, self.run_id,
                             self.yields, keep)
        self.yields += 1

    def retire(self, worker: str) -> None:
        """Take a worker out of the cluster (the cluster starts a fresh one in its place)."""
        self.client.retire_workers(workers=[worker], close_workers=True)

    def cancel(self) -> None:
        """Forget every task; tell the scheduler only if it is still there (asking a lost one
        would wait out the connection timeout)."""
        futures = [*self.pending.futures, *self._finished, *self._pulls]
        self._pulls = []
        self.pending.clear()
        self.items.clear()
        self._unsent.clear()
        self._finished.clear()
        running = self.client.status == "running"
        if futures and running:
            with contextlib.suppress(Exception):
                self.client.cancel(futures)
        if self.processor is not None and running:
            self.processor.release()

    def finish(self) -> None:
        """The run is over: workers drop what they still hold for it."""
        if self.client.status == "running":
            with contextlib.suppress(Exception):
                self.client.run(resident.forget, self.run_id, on_error="ignore")
