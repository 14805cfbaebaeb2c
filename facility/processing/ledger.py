"""The chunk ledger: every chunk of a run is accounted for exactly once.

A chunk is ``pending`` until its result is merged into the run's result (``done``) or it is
given up on (``skipped``, with the reason). In between it may be ``held``: processed, its
result merged into an accumulator that is still on the worker that processed it; it becomes
``done`` when that accumulator is collected, or ``pending`` again if its worker is lost first.
A result that arrives for a chunk already done (a task that ran twice after a worker died, a
resubmission racing the original) is refused, so nothing is counted twice. A
file that could not even be inspected has no chunks: it is recorded as a whole, with the
events the catalog gives it, so that skipped input is never missing from the accounts.

The ledger is the run's state in memory; :mod:`facility.processing.journal` makes it durable,
and it is written with the outputs as JSON lines, one line per chunk (and per skipped file).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from facility.processing.plan import Chunk, FileTask


class LedgerError(RuntimeError):
    """The ledger was asked to do something that would lose or double-count a chunk."""


@dataclass
class Entry:
    chunk: Chunk
    state: str = "pending"
    attempts: int = 0
    reason: str | None = None
    replica: str | None = None
    worker: str | None = None
    seconds: float | None = None
    resumed: bool = False

    def as_record(self) -> dict[str, Any]:
        return {"chunk": self.chunk.chunk_id, "state": self.state, "events": self.chunk.events,
                "attempts": self.attempts, "replica": self.replica, "worker": self.worker,
                "seconds": self.seconds, "reason": self.reason, "resumed": self.resumed}


@dataclass
class SkippedFile:
    """A file given up on at preflight: its entries are unknown, the catalog's count stands."""

    task: FileTask
    reason: str

    def as_record(self) -> dict[str, Any]:
        return {"file": self.task.label, "state": "skipped", "stage": "preflight",
                "events": self.task.catalog_events, "reason": self.reason}


@dataclass
class ChunkLedger:
    entries: dict[str, Entry] = field(default_factory=dict)
    skipped_files: dict[str, SkippedFile] = field(default_factory=dict)
    duplicates_refused: int = 0
    redone: int = 0  # chunks processed again because the worker holding them was lost
    # chunks and events by state, kept as chunks move: progress is asked for often
    _counts: Counter[str] = field(default_factory=Counter)
    _events: Counter[str] = field(default_factory=Counter)

    def add(self, chunk: Chunk) -> None:
        if chunk.chunk_id in self.entries:
            raise LedgerError(f"chunk {chunk.chunk_id} planned twice")
        self.entries[chunk.chunk_id] = Entry(chunk)
        self._counts["pending"] += 1
        self._events["pending"] += chunk.events

    def _move(self, entry: Entry, state: str) -> None:
        for tally, amount in ((self._counts, 1), (self._events, entry.chunk.events)):
            tally[entry.state] -= amount
            tally[state] += amount
        entry.state = state

    def attempt(self, chunk_id: str) -> int:
        entry = self.entries[chunk_id]
        entry.attempts += 1
        return entry.attempts

    def settle_done(self, chunk_id: str, *, replica: str | None = None,
                    worker: str | None = None, seconds: float | None = None,
                    resumed: bool = False) -> bool:
        """Mark a chunk merged into the run's result; returns False (and merges nothing) if it
        was settled already. Details the chunk's receipt gave when it was held are kept."""
        entry = self.entries[chunk_id]
        if entry.state not in ("pending", "held"):
            self.duplicates_refused += 1
            return False
        self._move(entry, "done")
        entry.replica = replica or entry.replica
        entry.worker = worker or entry.worker
        entry.seconds = seconds if seconds is not None else entry.seconds
        entry.resumed = resumed
        return True

    def hold(self, chunk_id: str, *, replica: str, worker: str | None, seconds: float) -> bool:
        """A chunk's receipt: its result waits in its worker's accumulator. A receipt for a
        chunk already merged only completes its details."""
        entry = self.entries[chunk_id]
        if entry.state == "done" and entry.replica is None:
            entry.replica, entry.worker, entry.seconds = replica, worker, seconds
        if entry.state != "pending":
            return False
        self._move(entry, "held")
        entry.replica, entry.worker, entry.seconds = replica, worker, seconds
        return True

    def unhold(self, chunk_id: str) -> bool:
        """The accumulator holding the chunk was lost with its worker: it is to be done again."""
        entry = self.entries[chunk_id]
        if entry.state != "held":
            return False
        self._move(entry, "pending")
        self.redone += 1
        return True

    def settle_skipped(self, chunk_id: str, reason: str, resumed: bool = False) -> bool:
        entry = self.entries[chunk_id]
        if entry.state != "pending":
            return False
        self._move(entry, "skipped")
        entry.reason, entry.resumed = reason, resumed
        return True

    def skip_file(self, task: FileTask, reason: str) -> None:
        if any(e.chunk.file.label == task.label for e in self.entries.values()):
            raise LedgerError(f"{task.label} has planned chunks; skip them, not the file")
        self.skipped_files[task.label] = SkippedFile(task, reason)

    def write(self, path: Path) -> None:
        with open(path, "w") as out:
            for entry in self.entries.values():
                out.write(json.dumps(entry.as_record()) + "\n")
            for skipped in self.skipped_files.values():
                out.write(json.dumps(skipped.as_record()) + "\n")

    def pending(self) -> list[str]:
        if not self._counts["pending"]:
            return []
        return [cid for cid, e in self.entries.items() if e.state == "pending"]

    def count(self, state: str) -> int:
        return self._counts[state]

    def events(self, state: str, dataset: str | None = None) -> int:
        """Events of chunks in ``state`` (for ``skipped``, whole files skipped at preflight too)."""
        total = self._events[state] if dataset is None else sum(
            e.chunk.events for e in self.entries.values()
            if e.state == state and e.chunk.file.dataset == dataset)
        if state == "skipped":
            total += sum(s.task.catalog_events for s in self.skipped_files.values()
                         if dataset in (None, s.task.dataset))
        return total

    def check_complete(self) -> None:
        """At the end of a run no chunk may be left unaccounted for."""
        left = self.pending() + [c for c, e in self.entries.items() if e.state == "held"]
        if left:
            raise LedgerError(f"{len(left)} chunks were never settled, first: {left[0]}")
