"""What runs on a worker: open a file (failing over between replicas), inspect it, process a chunk.

Speed comes from three things plain runners do not do:

* an open-file cache per worker process that also keeps the deserialized tree, so a file's
  metadata (hundreds of branches) is parsed once per worker, not once per chunk;
* the branches a processor touched in earlier chunks are read up front in one bulk request
  (one vector read over ``root://``), and anything else it touches is still read lazily;
* chunks sit on cluster boundaries, so no basket is decompressed twice.

Errors that come from the input (unreachable, truncated, corrupt) become :class:`InputError`
naming the dataset file and every replica tried; errors in the processor's own code pass through.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import OrderedDict
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import uproot
from coffea.nanoevents import NanoAODSchema, NanoEventsFactory

from facility.processing.chunks import Chunk, FileInfo, FileTask

READ_LIBRARIES = ("/uproot/", "/XRootD/", "/fsspec", "/fsspec_xrootd/", "/cramjam", "/zstandard")
_open_files: OrderedDict[str, Any] = OrderedDict()
_columns_touched: dict[str, set[str]] = {}
_open_limit = 16
# The deserialized TTree (hundreds of branch records) is kept with its open file: rebuilding it
# for every chunk costs about as much as reading the chunk's columns.
TREES_KEPT_PER_FILE = 4
_failed_endpoints: dict[str, float] = {}
FAILED_ENDPOINT_MEMORY = 60.0


class FacilityNanoAODSchema(NanoAODSchema):
    """NanoAOD as skimmed files carry it: cross-references to dropped collections are normal."""

    warn_missing_crossrefs = False


class InputError(Exception):
    """An input file could not be read; names the file and why."""

    def __init__(self, file: str, reason: str, url: str | None = None) -> None:
        super().__init__(file, reason, url)
        self.file, self.reason, self.url = file, reason, url

    def __str__(self) -> str:
        where = f" ({self.url})" if self.url else ""
        return f"cannot read input file {self.file}{where}: {self.reason}"


@dataclass
class ChunkOutput:
    """A processed chunk: the processor's accumulator and how it was obtained."""

    chunk_id: str
    output: Any
    events: int
    replica: str
    worker_pid: int
    seconds: float
    columns: list[str] = field(default_factory=list)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


def _open_tree(url: str, tree: str, timeout: int) -> Any:
    handle = uproot.open(url, timeout=timeout, array_cache=None, object_cache=TREES_KEPT_PER_FILE)
    try:
        handle[tree]
    except KeyError:
        handle.close()
        raise KeyError(f"no tree {tree!r} in the file") from None
    return handle


def _endpoint(url: str) -> str:
    return url.split("//", 2)[1] if url.count("//") >= 2 else url


def _replica_order(urls: tuple[str, ...]) -> list[str]:
    """Replicas on endpoints that failed recently go last (they are still tried)."""
    now = time.monotonic()
    recent = {ep for ep, when in _failed_endpoints.items() if now - when < FAILED_ENDPOINT_MEMORY}
    return sorted(urls, key=lambda url: _endpoint(url) in recent)


def _server_unreachable(exc: BaseException) -> bool:
    """A dead or unreachable server (not a missing or broken file on a live one)."""
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(
        sign in text for sign in ("connection", "expired", "socket", "unreachable"))


def open_file(task: FileTask, timeout: int) -> tuple[str, Any]:
    """The first readable replica of a file (cached per worker process)."""
    failures = []
    for url in _replica_order(task.urls):
        if url in _open_files:
            _open_files.move_to_end(url)
            return url, _open_files[url]
        try:
            handle = _open_tree(url, task.tree, timeout)
        except Exception as exc:
            if _server_unreachable(exc):
                _failed_endpoints[_endpoint(url)] = time.monotonic()
            failures.append(f"{url}: {_short(exc)}")
            continue
        _open_files[url] = handle
        while len(_open_files) > _open_limit:
            _, old = _open_files.popitem(last=False)
            old.close()
        return url, handle
    raise InputError(task.label, "no replica could be opened; " + "; ".join(failures))


def forget_file(url: str) -> None:
    handle = _open_files.pop(url, None)
    if handle is not None:
        handle.close()


def inspect_file(task: FileTask, timeout: int) -> FileInfo:
    """Preflight: entries and cluster boundaries of a file."""
    url, handle = open_file(task, timeout)
    try:
        _check_complete(handle)
        tree = handle[task.tree]
        entries = int(tree.num_entries)
        starts = tuple(int(x) for x in tree.common_entry_offsets())
    except Exception as exc:
        forget_file(url)
        raise InputError(task.label, _short(exc), url) from None
    return FileInfo(task, url, entries, starts)


def _check_complete(handle: Any) -> None:
    """A file shorter than its header says was cut off in a copy or a write."""
    expected = int(handle.file.fEND)
    actual = handle.file.source.num_bytes
    if actual is not None and actual < expected:
        raise ValueError(f"truncated: {actual} bytes, the ROOT header says {expected}")


def _raised_while_reading(tb: TracebackType | None) -> bool:
    return any(any(lib in frame.filename for lib in READ_LIBRARIES)
               for frame in traceback.extract_tb(tb))


def processor_key(processor: Any) -> str:
    kind = type(processor)
    return f"{kind.__module__}.{kind.__qualname__}"


def process_chunk(processor: Any, chunk: Chunk, timeout: int = 30,
                  open_limit: int | None = None) -> ChunkOutput:
    """Run a coffea processor over one chunk and return its accumulator."""
    started = time.perf_counter()
    if open_limit is not None:
        set_open_limit(open_limit)
    url, handle = open_file(chunk.file, timeout)
    tree = handle[chunk.file.tree]
    if chunk.file_entries >= 0 and tree.num_entries != chunk.file_entries:
        forget_file(url)
        raise InputError(chunk.file.label, f"the file has {tree.num_entries} entries, the run "
                         f"planned for {chunk.file_entries}: it changed after it was inspected", url)
    key = processor_key(processor)
    preload = sorted(name for name in _columns_touched.get(key, ()) if name in tree)
    accessed: list[Any] = []
    metadata = {"dataset": chunk.file.dataset, "filename": chunk.file.name, **chunk.file.metadata}
    try:
        events = NanoEventsFactory.from_root(
            handle, treepath=chunk.file.tree, entry_start=chunk.entry_start,
            entry_stop=chunk.entry_stop, mode="virtual", preload=preload or None,
            schemaclass=FacilityNanoAODSchema, metadata=metadata, access_log=accessed,
        ).events()
    except Exception as exc:
        forget_file(url)
        raise InputError(chunk.file.label, f"entries {chunk.entry_start}-{chunk.entry_stop}: "
                         f"{_short(exc)}", url) from None
    try:
        output = processor.process(events)
    except Exception as exc:
        if not _raised_while_reading(exc.__traceback__):
            raise
        forget_file(url)
        raise InputError(chunk.file.label, f"entries {chunk.entry_start}-{chunk.entry_stop}: "
                         f"{_short(exc)}", url) from None
    columns = sorted({entry.branch for entry in accessed})
    _columns_touched.setdefault(key, set()).update(columns)
    return ChunkOutput(chunk.chunk_id, output, chunk.events, url, os.getpid(),
                       time.perf_counter() - started, columns)


def set_open_limit(limit: int) -> None:
    global _open_limit
    _open_limit = limit
