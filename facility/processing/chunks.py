"""Work units: files resolved to replicas, and the chunks a file is cut into.

Chunk boundaries follow the file's cluster (basket) boundaries where it has them, so that no
basket is read and decompressed by two tasks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FileTask:
    """A logical file of a dataset with its replica URLs, nearest first."""

    dataset: str
    name: str
    tree: str
    urls: tuple[str, ...]
    catalog_events: int
    metadata: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.name}"


@dataclass(frozen=True)
class FileInfo:
    """What preflight learned about a file."""

    task: FileTask
    url: str
    entries: int
    cluster_starts: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """A range of entries of one file: the unit of work and of accounting."""

    file: FileTask
    entry_start: int
    entry_stop: int
    file_entries: int = -1  # what preflight saw; a file that no longer has them changed since

    @property
    def chunk_id(self) -> str:
        return f"{self.file.dataset}/{self.file.name}:{self.entry_start}-{self.entry_stop}"

    @property
    def events(self) -> int:
        return self.entry_stop - self.entry_start


def plan_chunks(info: FileInfo, chunk_size: int) -> list[Chunk]:
    """Cut a file into chunks of about ``chunk_size`` entries on cluster boundaries."""
    if info.entries == 0:
        return []
    n_chunks = max(1, round(info.entries / chunk_size))
    targets = np.linspace(0, info.entries, n_chunks + 1).round().astype(int)
    starts = np.asarray(sorted({*info.cluster_starts, 0, info.entries}))
    if len(starts) - 1 >= n_chunks:
        # clusters are finer than the chunks: snap each edge to the nearest cluster start
        targets = np.asarray([starts[np.abs(starts - t).argmin()] for t in targets])
    edges = sorted({0, info.entries, *(int(t) for t in targets)})
    return [Chunk(info.task, a, b, info.entries) for a, b in itertools.pairwise(edges) if b > a]
