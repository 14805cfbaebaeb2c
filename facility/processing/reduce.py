"""Reduce: the run's merged result, and exactly which chunks it holds.

A partial result always travels with the set of chunk ids it contains. Merging refuses a partial
that shares a chunk with what is already merged, so a chunk that ran twice (a worker died after
finishing it, a retry raced the original) can never be counted twice, and a checkpoint written
from here says precisely which chunks a resumed run may skip.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from coffea.processor import accumulate


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
        self.accumulator = output if self.accumulator is None else accumulate(
            [output], self.accumulator)
        self.chunks |= incoming

    def __contains__(self, chunk_id: str) -> bool:
        return chunk_id in self.chunks
