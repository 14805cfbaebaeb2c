"""Reduce: the run's merged result, and exactly which chunks it holds.

The reduction has two levels. Each worker merges the chunks it processes into an accumulator of
its own (:mod:`.resident`); the client merges those, one per worker per collection
(:class:`Reducer`), and keeps track of which chunks wait on which worker (:class:`Holdings`).

A partial result always travels with the set of chunk ids it contains. Merging refuses a partial
that shares a chunk with what is already merged, so a chunk that ran twice (a worker died after
finishing it, a retry raced the original) can never be counted twice, and a checkpoint written
from here says precisely which chunks a resumed run may skip.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import hist
import numpy as np
from coffea.processor import accumulate


def merge_into(total: Any, part: Any) -> Any:
    """``total`` with ``part`` added in place; ``part`` is left unchanged.

    The same sums as coffea's ``accumulate``, with the common types first: coffea tells them
    apart with ``isinstance`` against a runtime protocol, which costs more than adding two
    ten-thousand-bin histograms and would be paid for every chunk of a run.
    """
    if isinstance(total, hist.Hist | np.ndarray | int | float):
        total += part
        return total
    if isinstance(total, dict) and type(part) is type(total):
        for key, value in part.items():
            total[key] = merge_into(total[key], value) if key in total else copy.deepcopy(value)
        return total
    return accumulate([part], total)


class ReduceError(RuntimeError):
    """A partial result would have counted some chunks twice."""


class Reducer:
    """The accumulator of a run and the chunk ids merged into it."""

    def __init__(self) -> None:
        self.accumulator: Any = None
        self.chunks: set[str] = set()

    def seed(self, accumulator: Any, chunks: Iterable[str]) -> None:
        """Start from a checkpoint (a resumed run)."""
        if self.chunks:
            raise ReduceError("a reducer is seeded only before anything is merged")
        self.accumulator, self.chunks = accumulator, set(chunks)

    def add(self, chunks: Iterable[str], output: Any) -> None:
        """Merge a partial result holding ``chunks``."""
        incoming = set(chunks)
        twice = incoming & self.chunks
        if twice:
            raise ReduceError(f"{len(twice)} chunks would be merged twice, first: {min(twice)}")
        # in place: the merged result is this run's own object, never a caller's
        self.accumulator = output if self.accumulator is None else merge_into(
            self.accumulator, output)
        self.chunks |= incoming

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self.chunks


class Holdings:
    """Which chunks wait in which worker's accumulator, until it is collected or lost.

    A holder is one worker process. A holder declared lost (it did not answer a collection)
    stays lost: anything it hands over later is dropped, since its chunks are done again.
    """

    def __init__(self) -> None:
        self._held: defaultdict[str, set[str]] = defaultdict(set)
        self.lost: set[str] = set()

    def hold(self, holder: str, chunk_id: str) -> bool:
        """A receipt; False if the holder is lost (the chunk must be done again)."""
        if holder in self.lost:
            return False
        self._held[holder].add(chunk_id)
        return True

    def held_by(self, holder: str) -> set[str]:
        return set(self._held.get(holder, ()))

    def take(self, holder: str, chunks: Iterable[str]) -> set[str]:
        """These chunks leave the holder (collected, or to be done again); returns those it
        held."""
        held = self._held.get(holder)
        if held is None:
            return set()
        taken = held & set(chunks)
        held -= taken
        if not held:
            del self._held[holder]
        return taken

    def lose(self, holder: str) -> set[str]:
        """A holder that did not answer: the chunks it held are to be done again."""
        self.lost.add(holder)
        return self._held.pop(holder, set())

    def holders(self) -> set[str]:
        return set(self._held)

    def __len__(self) -> int:
        return sum(len(chunks) for chunks in self._held.values())
