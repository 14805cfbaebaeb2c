"""Plan: which files a run reads, in which replica order, and the chunks each file is cut into.

Nothing here talks to the cluster. The plan is a pure function of the catalog, the regions'
distances, the endpoints known to be unhealthy and what preflight learned about each file, so a
resumed run plans exactly the chunks the interrupted one did.

Chunk boundaries follow the file's cluster (basket) boundaries where it has them, so that no
basket is read and decompressed by two tasks. A chunk's id names the dataset file and the entry
range, never the replica: the same chunk read from another region is the same chunk.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from facility.config import FacilityConfig
from facility.data.catalog import Dataset, rank_replicas
from facility.errors import UsageError


@dataclass(frozen=True)
class FileTask:
    """A logical file of a dataset with its replica URLs, in the order they are tried."""

    dataset: str
    name: str
    tree: str
    urls: tuple[str, ...]
    catalog_events: int
    metadata: dict = field(default_factory=dict, hash=False, compare=False)
    schema: str = "nanoaod"

    @property
    def label(self) -> str:
        return f"{self.dataset}/{self.name}"

    def as_record(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> FileTask:
        return cls(**{**record, "urls": tuple(record["urls"])})

    def ranked(self, unhealthy: Iterable[str], damaged: Iterable[str] = ()) -> FileTask:
        """The same file with replicas on unhealthy endpoints, then replicas found damaged,
        moved last (the order is kept otherwise: they are still tried, last)."""
        bad_endpoints, bad_urls = set(unhealthy), set(damaged)
        urls = tuple(sorted(self.urls, key=lambda url: (url in bad_urls,
                                                        endpoint(url) in bad_endpoints)))
        return self if urls == self.urls else dataclasses.replace(self, urls=urls)

    def preferring(self, url: str) -> FileTask:
        """The same file with ``url`` (the replica preflight could read) tried first."""
        if url not in self.urls or self.urls[0] == url:
            return self
        return dataclasses.replace(self, urls=(url, *(u for u in self.urls if u != url)))


@dataclass(frozen=True)
class FileInfo:
    """What preflight learned about a file."""

    task: FileTask
    url: str
    entries: int
    cluster_starts: tuple[int, ...]

    def as_record(self) -> dict[str, Any]:
        return {"file": self.task.label, "url": self.url, "entries": self.entries,
                "clusters": list(self.cluster_starts)}

    @property
    def differs_from_catalog(self) -> bool:
        return self.entries != self.task.catalog_events


@dataclass(frozen=True)
class Chunk:
    """A range of entries of one file: the unit of work and of accounting."""

    file: FileTask
    entry_start: int
    entry_stop: int
    file_entries: int = -1  # what preflight saw; a file that no longer has them changed since

    @functools.cached_property
    def chunk_id(self) -> str:
        """Asked for at every step of the chunk's accounting: made once."""
        return f"{self.file.dataset}/{self.file.name}:{self.entry_start}-{self.entry_stop}"

    @property
    def events(self) -> int:
        return self.entry_stop - self.entry_start

    def ranked(self, unhealthy: Iterable[str], damaged: Iterable[str] = ()) -> Chunk:
        ranked = self.file.ranked(unhealthy, damaged)
        return self if ranked is self.file else dataclasses.replace(self, file=ranked)


def endpoint(url: str) -> str:
    """Host and port of a replica's server (``local`` for a path on this machine)."""
    parts = urlsplit(url)
    return parts.netloc if parts.scheme != "file" else "local"


def checked_chunk_size(asked: int | None, configured: int) -> int:
    """The chunk size of a run; zero or negative is refused rather than silently replaced."""
    if asked is None:
        return configured
    if isinstance(asked, bool) or not isinstance(asked, int) or asked <= 0:
        raise UsageError(f"chunk_size must be a positive number of events, got {asked!r} "
                         f"(processing.chunk_size is {configured:,})")
    return asked


def checked_fraction(asked: float | None, configured: float) -> float:
    if asked is None:
        return configured
    if not 0.0 <= asked <= 1.0:
        raise UsageError(f"max_skipped_fraction must be between 0 and 1, got {asked!r}")
    return float(asked)


DEFAULT_PORTS = {"root": 1094, "https": 443, "http": 80, "s3": 443}


def _reachable(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path).exists()
    if parts.scheme not in DEFAULT_PORTS:
        return True  # nothing to probe: its reader knows
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            return True
    except OSError:
        return False


def unreachable_endpoints(tasks: Iterable[FileTask]) -> set[str]:
    """Endpoints that do not accept a connection now (probed once each, from the client)."""
    first_url = {endpoint(url): url for task in tasks for url in task.urls}
    return {ep for ep, url in first_url.items() if not _reachable(url)}


def file_tasks(datasets: Iterable[Dataset], config: FacilityConfig) -> list[FileTask]:
    """Logical files with replicas ranked: nearest region first, then protocol preference."""
    tasks = []
    for ds in datasets:
        # what a processor reads in events.metadata besides the chunk's own keys
        metadata = {**ds.metadata.model_dump(exclude_none=True), "events_total": ds.events}
        for entry in ds.files:
            ranked = rank_replicas(entry.replicas, config)
            tasks.append(FileTask(ds.name, entry.name, ds.tree, tuple(r.url for r in ranked),
                                  entry.events, metadata, ds.schema_name))
    return tasks


def plan_chunks(info: FileInfo, chunk_size: int) -> list[Chunk]:
    """Cut a file into chunks of about ``chunk_size`` entries, whole clusters each.

    A chunk that split a cluster would decompress that cluster's baskets once for each of its
    parts, so a file whose clusters are larger than ``chunk_size`` gets a chunk per cluster.
    Only a file that says nothing of its clusters is cut evenly.
    """
    if chunk_size <= 0:
        raise UsageError(f"chunk_size must be a positive number of events, got {chunk_size}")
    if info.entries == 0:
        return []
    n_chunks = max(1, round(info.entries / chunk_size))
    targets = np.linspace(0, info.entries, n_chunks + 1).round().astype(int)
    if info.cluster_starts:
        targets = _nearest(np.asarray(sorted({*info.cluster_starts, 0, info.entries})), targets)
    edges = sorted({0, info.entries, *(int(t) for t in targets)})
    return [Chunk(info.task, a, b, info.entries) for a, b in itertools.pairwise(edges) if b > a]


def _nearest(starts: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """The cluster start nearest each target (the earlier one on a tie)."""
    above = np.clip(np.searchsorted(starts, targets), 1, len(starts) - 1)
    below = above - 1
    return np.where(targets - starts[below] <= starts[above] - targets, starts[below],
                    starts[above])


class Inspections:
    """What preflight learned, kept for this process's later runs over the same files.

    A re-run over the same files (the usual interactive loop) plans its chunks at once; each
    chunk still checks on the worker that its file has the entries the plan was made for, and a
    file that failed is inspected again next time.
    """

    def __init__(self, kept: int = 100_000) -> None:
        self.kept = kept
        self._known: dict[tuple, FileInfo] = {}

    @staticmethod
    def _key(task: FileTask) -> tuple:
        return (task.label, frozenset(task.urls), task.catalog_events, task.tree)

    def get(self, task: FileTask) -> FileInfo | None:
        known = self._known.get(self._key(task))
        return None if known is None else dataclasses.replace(known, task=task)

    def remember(self, info: FileInfo) -> None:
        if len(self._known) >= self.kept:
            self._known.pop(next(iter(self._known)))
        self._known[self._key(info.task)] = info

    def forget(self, label: str) -> None:
        for key in [k for k in self._known if k[0] == label]:
            del self._known[key]


INSPECTIONS = Inspections()
