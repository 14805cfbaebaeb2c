"""The journal: a run's durable record in its folder, replayed to resume it.

Three files, written so that a run killed at any instant (client, scheduler, the machine) leaves
a state from which it can resume without losing or double-counting a chunk:

``run.json``
    what was asked: processor, datasets, files with their replicas, chunk size, policy
    (written once, atomically, before any work is submitted);
``journal.jsonl``
    append-only, one JSON record a line: each file's preflight (entries, cluster boundaries),
    each chunk or file skipped as bad input, each checkpoint and the chunks it holds, and
    finally that every chunk is settled;
``checkpoint.pkl``
    the merged accumulator and the exact set of chunk ids it contains, replaced atomically
    (temporary file, fsync, rename) every ``processing.checkpoint_seconds``.

A chunk is journaled as done only after a checkpoint holding its result is durable, so on replay
the checkpoint's own chunk list is the truth; a torn last line of the journal (the process died
while writing it) is ignored.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cloudpickle

SPEC_FILE = "run.json"
JOURNAL_FILE = "journal.jsonl"
CHECKPOINT_FILE = "checkpoint.pkl"
PROCESSOR_FILE = "processor.pkl"


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` so that a reader sees the old or the new content, never a mix."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    tmp.replace(path)
    _fsync_folder(path.parent)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Journal:
    """Appends a run's records to its folder, durably where a resume depends on them."""

    def __init__(self, folder: Path, checkpoints: int = 0) -> None:
        self.folder = folder
        self._out = open(folder / JOURNAL_FILE, "a")  # noqa: SIM115 (open for the run's life)
        self.checkpoints = checkpoints  # a resumed run numbers its checkpoints on

    @classmethod
    def start(cls, folder: Path, spec: dict[str, Any], processor: bytes) -> Journal:
        """A new run's folder: the spec and the processor first, then an empty journal."""
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / PROCESSOR_FILE, processor)
        write_atomically(folder / SPEC_FILE, json.dumps(spec, indent=1).encode())
        return cls(folder)

    def _append(self, record: dict[str, Any], durable: bool) -> None:
        self._out.write(json.dumps(record, default=str) + "\n")
        self._out.flush()
        if durable:
            os.fsync(self._out.fileno())

    def inspected(self, record: dict[str, Any]) -> None:
        """A file's preflight (not fsync'd: a lost record only means inspecting it again)."""
        self._append({"event": "inspected", **record}, durable=False)

    def skipped(self, record: dict[str, Any]) -> None:
        """A chunk or a whole file given up on as bad input."""
        self._append({"event": "skipped", **record}, durable=True)

    def checkpoint(self, accumulator: Any, chunks: set[str], settled: list[dict[str, Any]]) -> None:
        """Make the merged result durable, then journal the chunks it newly holds."""
        self.checkpoints += 1
        payload = cloudpickle.dumps({"sequence": self.checkpoints, "chunks": sorted(chunks),
                                     "accumulator": accumulator, "written": now()})
        write_atomically(self.folder / CHECKPOINT_FILE, payload)
        for record in settled:
            self._append({"event": "done", "checkpoint": self.checkpoints, **record}, durable=False)
        self._append({"event": "checkpoint", "sequence": self.checkpoints, "chunks": len(chunks)},
                     durable=True)

    def settled(self, done: int, skipped: int) -> None:
        """Every chunk is accounted for: what is left is writing the outputs."""
        self._append({"event": "settled", "done": done, "skipped": skipped}, durable=True)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._out.close()


@dataclass
class Replay:
    """What an interrupted run left: enough to plan the same chunks and skip the settled ones."""

    spec: dict[str, Any]
    processor: bytes
    inspected: dict[str, dict[str, Any]] = field(default_factory=dict)
    skipped: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    accumulator: Any = None
    chunks: set[str] = field(default_factory=set)
    checkpoints: int = 0


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path) as journal:
        for line in journal:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                return  # a torn last line: the process died while writing it


def replay(folder: Path) -> Replay:
    """Read a run folder back: its spec, preflights, skips and the last durable checkpoint."""
    state = Replay(json.loads((folder / SPEC_FILE).read_text()),
                   (folder / PROCESSOR_FILE).read_bytes())
    for record in _records(folder / JOURNAL_FILE):
        event = record.get("event")
        if event == "inspected":
            state.inspected[record["file"]] = record
        elif event == "skipped":
            state.skipped[record.get("chunk") or record["file"]] = record
        elif event == "done":
            state.done[record["chunk"]] = record
    checkpoint = folder / CHECKPOINT_FILE
    if checkpoint.exists():
        saved = cloudpickle.loads(checkpoint.read_bytes())
        state.accumulator, state.chunks = saved["accumulator"], set(saved["chunks"])
        state.checkpoints = saved["sequence"]
    return state
