"""Accumulators that stay on the workers: the first level of a run's reduction.

A worker merges every chunk it processes for a run, as soon as it is processed, into one
accumulator of its own and sends back only a small receipt per chunk. Every collection
(``client.run(collect, ...)``, about once per checkpoint) hands over the merged accumulator
with the exact chunk ids it holds and starts a new one, so the client receives one partial per
worker per collection, however many chunks there are. A worker that dies takes its uncollected
chunks with it; the client sees that their holder did not answer the collection and processes
them again.

Bundles are large while the run's queue is long (few tasks for the scheduler). When it runs dry
the client asks the workers to *yield*: every bundle hands back the chunks it has not started,
and the client spreads them over the slots that would otherwise idle to the end of the run.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from facility.processing.reduce import merge_into

STALE_SECONDS = 6 * 3600.0  # a run whose client died leaves its accumulator behind this long


@dataclass(frozen=True)
class Held:
    """What one worker handed over at a collection."""

    holder: str
    chunks: frozenset[str]
    output: Any = None


@dataclass
class _Resident:
    lock: threading.Lock = field(default_factory=threading.Lock)
    output: Any = None
    chunks: set[str] = field(default_factory=set)
    touched: float = field(default_factory=time.monotonic)


_residents: dict[str, _Resident] = {}
_registry_lock = threading.Lock()
# per run, the newest yield and how many chunks a bundle keeps: bundles submitted before it hand
# back the chunks they have not started beyond that many
_yielded: dict[str, tuple[int, int]] = {}


def holder_name(address: str) -> str:
    """A worker process: its address, and its pid in case a new one reuses the address."""
    return f"{address}#{os.getpid()}"


def _resident(run_id: str) -> _Resident:
    with _registry_lock:
        found = _residents.get(run_id)
        if found is None:  # a new run: the time to drop what runs long gone left behind
            now = time.monotonic()
            for stale in [r for r, held in _residents.items()
                          if now - held.touched > STALE_SECONDS]:
                del _residents[stale]
            found = _residents[run_id] = _Resident()
        return found


def absorb(run_id: str, chunks: Iterable[str], output: Any) -> bool:
    """Merge a chunk's result (or a partial holding ``chunks``); refused (False) if this worker
    holds one of them already, so that nothing is ever counted twice. The output itself is
    never changed: a processor may return a shared object."""
    incoming = set(chunks)
    resident = _resident(run_id)
    with resident.lock:
        if incoming & resident.chunks:
            return False
        resident.output = copy.deepcopy(output) if resident.output is None else merge_into(
            resident.output, output)
        resident.chunks |= incoming
        resident.touched = time.monotonic()
    return True


def collect(run_id: str, dask_worker: Any = None) -> Held:
    """Hand over what this worker holds for the run and start afresh (``client.run`` passes
    ``dask_worker``)."""
    holder = holder_name(dask_worker.address if dask_worker is not None else "local")
    with _registry_lock:
        resident = _residents.get(run_id)
    if resident is None:
        return Held(holder, frozenset())
    with resident.lock:
        held = Held(holder, frozenset(resident.chunks), resident.output)
        resident.output, resident.chunks = None, set()
        resident.touched = time.monotonic()
    return held


def yield_chunks(run_id: str, epoch: int, keep: int = 0) -> None:
    """The run's queue is empty while slots idle: bundles of this run submitted before yield
    ``epoch`` (running or waiting here) that have more than ``keep`` chunks not started finish
    the chunk they are on and hand the rest back, to be spread over the idle slots. Bundles
    made from what they hand back carry a later epoch and keep their chunks.

    ``keep`` is about each slot's share of what is left: a bundle with no more than that goes
    on, so that only the bundles that would end the run late are cut, and the slots that
    idle get their work from as few new tasks as will do.
    """
    newest = _yielded.get(run_id)
    if newest is None or epoch >= newest[0]:
        _yielded[run_id] = (epoch, keep)


def should_yield(run_id: str, epoch: int, left: int) -> bool:
    """Whether a bundle submitted in ``epoch``, with ``left`` chunks not started, is to hand
    them back."""
    newest = _yielded.get(run_id)
    return newest is not None and newest[0] >= epoch and left > newest[1]


def forget(run_id: str) -> None:
    """The run is over: drop whatever this worker still holds for it."""
    with _registry_lock:
        _residents.pop(run_id, None)
    _yielded.pop(run_id, None)
