"""Dispatch: the run's only door to the Dask cluster.

It ships the processor once as a task (not a scattered object: if every worker dies, the
scheduler recomputes a task, while scattered data is simply gone and every chunk that needed it
would be lost), submits preflights and chunks, and hands back what finished in batches, each
result already turned into a receipt or a :class:`~facility.processing.receipts.Failure`.
Dask's own failures are translated here: a task that killed every worker it ran on, a
scheduler that went away, a processor that cannot be loaded on the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import re
import sys
from collections.abc import Iterator
from typing import Any

import cloudpickle
from distributed import Client, Future, as_completed, get_worker
from distributed.scheduler import KilledWorker

from facility.errors import UserCodeError
from facility.processing.plan import Chunk, FileTask
from facility.processing.reader import (
    inspect_file,
    process_chunk,
    processor_key,
    users_own_file,
)
from facility.processing.receipts import Failure, Receipt, short

Item = Chunk | FileTask
Outcome = Receipt | Failure

LOST_POLL_SECONDS = 0.25


def _own_module(name: str) -> bool:
    """A module of the user's (beside their notebook), which workers cannot import by name."""
    path = getattr(sys.modules.get(name), "__file__", None)
    return name != "__main__" and path is not None and users_own_file(path)


def processor_payload(processor: Any) -> bytes:
    """The processor as bytes; classes from the user's own modules travel by value."""
    for cls in type(processor).__mro__:
        if _own_module(cls.__module__):
            cloudpickle.register_pickle_by_value(sys.modules[cls.__module__])
    try:
        return cloudpickle.dumps(processor)
    except Exception as exc:
        raise UserCodeError(f"the processor {processor_key(processor)} cannot be sent to the "
                            f"workers: {short(exc)}") from exc


def _load_processor(payload: bytes) -> Any:
    return cloudpickle.loads(payload)


def _worker_name() -> str:
    try:
        return str(get_worker().address)
    except ValueError:
        return f"pid {os.getpid()}"


def _stamped(outcome: Outcome) -> Outcome:
    return dataclasses.replace(outcome, worker=_worker_name())


def _inspect_task(task: FileTask, timeout: int, avoid: frozenset[str]) -> Outcome:
    return _stamped(inspect_file(task, timeout, avoid))


def _chunk_task(processor: Any, chunk: Chunk, timeout: int, open_limit: int,
                avoid: frozenset[str]) -> Outcome:
    return _stamped(process_chunk(processor, chunk, timeout, open_limit, avoid))


class SchedulerLost(ConnectionError):
    """The client lost its scheduler while fetching results."""


async def _gather_unless_lost(client: Client, futures: list[Future]) -> list[Any]:
    """The results of finished futures; gives up as soon as the client loses its scheduler,
    instead of waiting out the reconnection timeout."""
    if not futures:
        return []
    fetching = asyncio.ensure_future(client.gather(futures, asynchronous=True))
    while True:
        done, _ = await asyncio.wait([fetching], timeout=LOST_POLL_SECONDS)
        if done:
            return list(fetching.result())
        if client.status != "running":
            fetching.cancel()
            raise SchedulerLost(f"the client lost the scheduler ({client.status})")


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


class Dispatcher:
    """Submits a run's tasks and yields their outcomes as they finish."""

    def __init__(self, client: Client, run_id: str, timeout: int, open_limit: int) -> None:
        self.client, self.run_id = client, run_id
        self.timeout, self.open_limit = timeout, open_limit
        self.pending = as_completed(loop=client.loop)
        self.items: dict[Any, Item] = {}  # by task key
        self.processor: Future | None = None
        self._numbers = itertools.count()

    def ship(self, processor: Any) -> None:
        """Send the processor once; every chunk task depends on it."""
        self.processor = self.client.submit(_load_processor, processor_payload(processor),
                                            key=f"processor-{self.run_id}", pure=False)

    def _key(self, kind: str) -> str:
        return f"{kind}-{self.run_id}-{next(self._numbers)}"

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

    def process(self, chunk: Chunk, avoid: frozenset[str],
                avoid_workers: frozenset[str] = frozenset()) -> None:
        key = self._key("chunk")
        self.items[key] = chunk
        self.pending.add(self.client.submit(_chunk_task, self.processor, chunk, self.timeout,
                                            self.open_limit, avoid, key=key, pure=False,
                                            **self._placement(avoid_workers)))

    @property
    def in_flight(self) -> int:
        return len(self.items)

    def outcomes(self) -> Iterator[list[tuple[Item, Outcome]]]:
        """Batches of (item, outcome) as tasks finish; one round trip per batch of results."""
        for batch in self.pending.batches():
            yield self._collect(batch)

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

    def retire(self, worker: str) -> None:
        """Take a worker out of the cluster (the cluster starts a fresh one in its place)."""
        self.client.retire_workers(workers=[worker], close_workers=True)

    def cancel(self) -> None:
        """Forget every task; tell the scheduler only if it is still there (asking a lost one
        would wait out the connection timeout)."""
        futures = list(self.pending.futures)
        self.pending.clear()
        self.items.clear()
        if futures and self.client.status == "running":
            with contextlib.suppress(Exception):
                self.client.cancel(futures)
        if self.processor is not None and self.client.status == "running":
            self.processor.release()
