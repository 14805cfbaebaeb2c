"""The chunk ledger: every chunk of a run is accounted for exactly once.

A chunk is ``pending`` until its result is merged (``done``) or it is given up on (``skipped``,
with the reason). A result that arrives for a chunk already done (a task that ran twice after a
worker died, a resubmission racing the original) is refused, so nothing is counted twice. The
ledger is written to the run's output as JSON lines, one line per chunk.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from facility.processing.chunks import Chunk


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

    def as_record(self) -> dict:
        return {"chunk": self.chunk.chunk_id, "state": self.state, "events": self.chunk.events,
                "attempts": self.attempts, "replica": self.replica, "worker": self.worker,
                "seconds": self.seconds, "reason": self.reason}


@dataclass
class ChunkLedger:
    entries: dict[str, Entry] = field(default_factory=dict)
    duplicates_refused: int = 0

    def add(self, chunk: Chunk) -> None:
        if chunk.chunk_id in self.entries:
            raise LedgerError(f"chunk {chunk.chunk_id} planned twice")
        self.entries[chunk.chunk_id] = Entry(chunk)

    def attempt(self, chunk_id: str) -> int:
        entry = self.entries[chunk_id]
        entry.attempts += 1
        return entry.attempts

    def settle_done(self, chunk_id: str, *, replica: str, worker: str | None,
                    seconds: float) -> bool:
        """Mark a chunk merged; returns False (and merges nothing) if it was settled already."""
        entry = self.entries[chunk_id]
        if entry.state != "pending":
            self.duplicates_refused += 1
            return False
        entry.state, entry.replica, entry.worker, entry.seconds = "done", replica, worker, seconds
        return True

    def settle_skipped(self, chunk_id: str, reason: str) -> bool:
        entry = self.entries[chunk_id]
        if entry.state != "pending":
            return False
        entry.state, entry.reason = "skipped", reason
        return True

    def write(self, path: Path) -> None:
        with open(path, "w") as journal:
            for entry in self.entries.values():
                journal.write(json.dumps(entry.as_record()) + "\n")

    def pending(self) -> list[str]:
        return [cid for cid, e in self.entries.items() if e.state == "pending"]

    def count(self, state: str) -> int:
        return sum(1 for e in self.entries.values() if e.state == state)

    def events(self, state: str) -> int:
        return sum(e.chunk.events for e in self.entries.values() if e.state == state)

    def check_complete(self) -> None:
        """At the end of a run no chunk may be left unaccounted for."""
        left = self.pending()
        if left:
            raise LedgerError(f"{len(left)} chunks were never settled, first: {left[0]}")
