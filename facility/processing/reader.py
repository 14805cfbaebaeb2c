"""What runs on a worker: open a file, inspect it, process a chunk, failing over between replicas.

Speed comes from three things plain runners do not do:

* an open-file cache per worker process that also keeps the deserialized tree, so a file's
  metadata (hundreds of branches) is parsed once per worker, not once per chunk;
* the NanoEvents base form of a file (an awkward form for each of its hundreds of branches) is
  worked out once per worker and file, not once per chunk;
* the branches a processor touched in earlier chunks are read up front in one bulk request
  (one vector read over ``root://``), and anything else it touches is still read lazily;
* chunks sit on cluster boundaries, so no basket is decompressed twice.

Reliability comes from trying every replica inside the task before giving up: a replica whose
server is down or whose bytes are damaged is dropped from the cache and the next one is read.
What comes back is a receipt, or a :class:`~facility.processing.receipts.Failure` that says
whether the data (every replica, each with its reason) or the user's code is to blame. An
exception raised while the processor runs is the data's fault only if it was raised while
reading *this chunk's file* (a frame of the traceback holds one of that file's uproot objects);
anything else, a mistyped corrections file opened with uproot included, is the user's code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import pickle
import sysconfig
import time
import traceback
import types
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import fsspec
import uproot
from coffea.nanoevents import NanoEventsFactory
from coffea.nanoevents import factory as nanoevents_factory
from coffea.nanoevents.mapping import UprootSourceMapping

from facility.data.tls import https_context
from facility.data.tokens import describe as describe_token
from facility.data.tokens import find_token
from facility.processing.plan import Chunk, FileInfo, FileTask, endpoint
from facility.processing.receipts import (
    ChunkDone,
    Failure,
    Inspected,
    ReplicaFailure,
    ReplicaProblem,
    replica_problem,
    short,
)
from facility.processing.schemas import (
    SCHEMAS,
    quiet_schema_warnings,
    schema_class,
)

_open_files: OrderedDict[str, Any] = OrderedDict()
_columns_touched: dict[str, set[str]] = {}
_open_limit = 16
# The deserialized TTree (hundreds of branch records) is kept with its open file: rebuilding it
# for every chunk costs about as much as reading the chunk's columns.
TREES_KEPT_PER_FILE = 4
T = TypeVar("T")


class KeptCopies:
    """What a worker works out once per file and hands out again for every chunk: kept pickled,
    the least recently used dropped first, and every take a fresh copy (NanoEvents and the
    schemas fill each chunk's own metadata into what they are given)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._kept: OrderedDict[Any, bytes] = OrderedDict()

    def take(self, key: Any, make: Callable[[], Any]) -> Any:
        kept = self._kept.get(key)
        if kept is None:
            kept = self._kept[key] = pickle.dumps(make())
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        else:
            self._kept.move_to_end(key)
        return pickle.loads(kept)

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        self._kept.clear()


_base_forms = KeptCopies(64)
_schemas = KeptCopies(64)


def file_identity(file: Any) -> tuple[str, int]:
    """What tells an open ROOT file from any other: its UUID, which a rewritten file does not
    keep and a copy does, and where its content ends, so that two different files written with
    the same UUID (tools that fork write time-based ones) are not taken for one."""
    return str(file.uuid), int(file.fEND)


class FormKeepingMapping(UprootSourceMapping):
    """coffea's mapping of a ROOT tree, which keeps each file's base form once worked out.

    Building the form walks every branch of the tree (about a third of what a 50k-event chunk
    of a NanoAOD file costs besides its data), and it is the same for every chunk of a file (a
    file is known by :func:`file_identity`).
    """

    @classmethod
    def _extract_base_form(cls, tree: Any, iteritems_options: Any = None) -> Any:
        options = iteritems_options or {}
        key = (*file_identity(tree.file), str(tree.object_path),
               json.dumps(options, sort_keys=True, default=repr))
        return _base_forms.take(key, lambda: super(FormKeepingMapping, cls)._extract_base_form(
            tree, iteritems_options=options))


class KeptSchema:
    """A coffea schema, built once per file and schema, handed to NanoEvents in its place.

    Building a schema nests hundreds of branch forms into collections and cross-references
    (about a millisecond a chunk for NanoAOD), and the result depends only on the file's base
    form. Each chunk gets its own copy with its own metadata, the only part of a built schema
    that differs between chunks. Only coffea's schemas are kept (see
    :data:`~facility.processing.schemas.SCHEMAS`): a processor's own class may build what it
    likes from the metadata, so it is built afresh for every chunk.
    """

    def __init__(self, schema: type, file_key: tuple[Any, ...]) -> None:
        self.schema, self.key = schema, (*file_key, schema)

    def __call__(self, base_form: dict[str, Any]) -> Any:
        metadata = base_form["parameters"].get("metadata") or {}
        base_form["parameters"]["metadata"] = {}  # a built schema keeps only what it adds
        schema = _schemas.take(self.key, lambda: self.schema(base_form))
        parameters = schema.form["parameters"]
        parameters["metadata"] = {**metadata, **parameters["metadata"]}
        return schema


def _keep_base_forms() -> None:
    """NanoEventsFactory.from_root builds its mapping from a module attribute; ours is the same
    mapping with the form kept (the public ``known_base_form`` is honoured in dask mode only).
    Installed where the facility builds events (workers), so that nothing else in a client
    process, a plain coffea Runner for comparison included, is changed."""
    nanoevents_factory.UprootSourceMapping = FormKeepingMapping


class ReplicaBroken(Exception):
    """This replica cannot give the chunk (server down, bytes damaged): try the next one."""

    def __init__(self, problem: ReplicaProblem, reason: str) -> None:
        super().__init__(problem, reason)
        self.problem, self.reason = problem, reason


class UserCodeFailed(Exception):
    """The processor raised, and not while reading this chunk's file."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class AllReplicasFailed(Exception):
    """Every replica of a file was tried; carries each one's reason."""

    def __init__(self, failures: tuple[ReplicaFailure, ...]) -> None:
        super().__init__(failures)
        self.failures = failures


# ---------------------------------------------------------------------------------------------
# the open-file cache


def open_options(url: str, timeout: int) -> dict[str, Any]:
    """How long a read may wait, in the words of the URL's filesystem (s3fs takes botocore's),
    and over https the user's token (root:// presents it by itself, from the same file)."""
    if url.startswith("s3://"):
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": 2}}}
    if url.startswith(("https://", "davs://")):
        token = find_token()
        headers = {"Authorization": f"Bearer {token.value}"} if token else {}
        return {"timeout": timeout, "headers": headers, "ssl": https_context()}
    return {"timeout": timeout}


def _open_tree(url: str, tree: str, timeout: int) -> Any:
    handle = uproot.open(url, array_cache=None, object_cache=TREES_KEPT_PER_FILE,
                         **open_options(url, timeout))
    try:
        _remember_typenames(handle[tree])
    except KeyError:
        handle.close()
        raise KeyError(f"no tree {tree!r} in the file") from None
    return handle


def _remember_typenames(tree: Any) -> None:
    """NanoEvents asks the tree for every branch's C++ type name each time it builds a chunk's
    events (about a millisecond for NanoAOD's hundreds of branches: a tenth of what a chunk
    costs whatever its size), and an open file's answer never changes. The tree kept with the
    open file answers that question from memory; any other is passed on."""
    every_branch = tree.typenames()
    ask = tree.typenames

    def typenames(*args: Any, **kwargs: Any) -> dict[str, str]:
        return dict(every_branch) if not args and not kwargs else ask(*args, **kwargs)

    tree.typenames = typenames


def cached_open(url: str, tree: str, timeout: int) -> Any:
    """An open file (cached per worker process, least recently used closed first)."""
    if url in _open_files:
        _open_files.move_to_end(url)
        return _open_files[url]
    handle = _open_tree(url, tree, timeout)
    _open_files[url] = handle
    while len(_open_files) > _open_limit:
        _, old = _open_files.popitem(last=False)
        _close(old)
    return handle


def _close(handle: Any) -> None:
    # a handle on a dead server may fail to close; it is dropped all the same
    with contextlib.suppress(Exception):
        handle.close()


def _forget_connection(url: str, timeout: int, handle: Any = None) -> None:
    """Drop the server handle the URL's filesystem keeps open: the XRootD filesystem caches
    them by URL, and one whose server was restarted stays closed, so that every later open of
    the URL would fail. The filesystem is the handle's own, else the one uproot opens the URL
    with (its options, the timeout among them, select the filesystem instance)."""
    with contextlib.suppress(Exception):  # closing a dead server's handle may fail: dropped
        source = handle.file.source if handle is not None else None
        if source is not None and hasattr(source, "_fs"):
            filesystem, path = source._fs, source._file_path
        else:
            filesystem, path = fsspec.core.url_to_fs(url, **open_options(url, timeout))
        filesystem.invalidate_cache(path)


def forget_file(url: str, timeout: int = 30) -> None:
    """Drop a file that failed: our handle and its filesystem's connection."""
    handle = _open_files.pop(url, None)
    if handle is not None:
        _close(handle)
    _forget_connection(url, timeout, handle)


def drop_endpoints(endpoints: frozenset[str] | set[str]) -> None:
    """Close cached handles on endpoints the run found unhealthy: they are not read again."""
    for url in [u for u in _open_files if endpoint(u) in endpoints]:
        forget_file(url)


def set_open_limit(limit: int) -> None:
    global _open_limit
    _open_limit = limit


def _each_replica(task: FileTask, timeout: int, avoid: frozenset[str],
                  attempt: Callable[[str, Any], T]) -> tuple[T, str, list[ReplicaFailure]]:
    """``attempt(url, handle)`` on the first replica that gives a result, in the task's order.

    A replica that cannot be opened, or whose attempt raises :class:`ReplicaBroken`, is dropped
    from the cache and the next is tried; when none is left, :class:`AllReplicasFailed` carries
    every reason. A cached handle whose server stopped answering is first opened afresh once:
    the server may be back (restarted) and only the old connection gone.
    """
    drop_endpoints(avoid)
    failures: list[ReplicaFailure] = []
    for url in task.urls:
        stale = url in _open_files
        while True:
            try:
                handle = cached_open(url, task.tree, timeout)
            except Exception as exc:  # noqa: BLE001 (every open error is this replica's problem)
                _forget_connection(url, timeout)
                failures.append(_replica_failure(url, replica_problem(exc), short(exc)))
                break
            try:
                return attempt(url, handle), url, failures
            except ReplicaBroken as broken:
                forget_file(url, timeout)
                if stale and broken.problem == "unavailable":
                    stale = False
                    continue
                failures.append(_replica_failure(url, broken.problem, broken.reason))
                break
    raise AllReplicasFailed(tuple(failures))


def _replica_failure(url: str, problem: ReplicaProblem, reason: str) -> ReplicaFailure:
    """A refusal names the token this worker presented (never its value)."""
    if problem == "refused":
        reason = f"{reason} (presented: {describe_token(find_token())})"
    return ReplicaFailure(url, problem, reason)


def _input_failure(task: FileTask, failures: tuple[ReplicaFailure, ...], what: str) -> Failure:
    return Failure("input", failures, message=f"{what} of {task.label}: no replica could be read")


# ---------------------------------------------------------------------------------------------
# preflight


def _check_complete(handle: Any) -> None:
    """A file shorter than its header says was cut off in a copy or a write."""
    expected = int(handle.file.fEND)
    actual = handle.file.source.num_bytes
    if actual is not None and actual < expected:
        raise ValueError(f"truncated: {actual} bytes, the ROOT header says {expected}")


def _inspect(task: FileTask, url: str, handle: Any) -> FileInfo:
    try:
        _check_complete(handle)
        tree = handle[task.tree]
        entries = int(tree.num_entries)
        starts = cluster_starts(tree)
    except Exception as exc:  # noqa: BLE001 (anything raised reading the header is the replica's)
        raise ReplicaBroken(replica_problem(exc), short(exc)) from None
    return FileInfo(task, url, entries, starts)


def cluster_starts(tree: Any) -> tuple[int, ...]:
    """The first entry of every cluster, and the end: a TTree's common basket boundaries, an
    RNTuple's cluster summaries."""
    summaries = getattr(tree, "cluster_summaries", None)
    if summaries is not None:
        starts = [int(c.num_first_entry) for c in summaries]
        return (*starts, int(tree.num_entries))
    return tuple(int(x) for x in tree.common_entry_offsets())


def inspect_file(task: FileTask, timeout: int, avoid: frozenset[str] = frozenset()
                 ) -> Inspected | Failure:
    """Preflight: entries and cluster boundaries of the first readable replica."""
    try:
        info, _url, failed = _each_replica(task, timeout, avoid,
                                           lambda url, handle: _inspect(task, url, handle))
    except AllReplicasFailed as every:
        return _input_failure(task, every.failures, "preflight")
    return Inspected(info, worker=f"pid {os.getpid()}", replicas_failed=tuple(failed))


# ---------------------------------------------------------------------------------------------
# processing


def processor_key(processor: Any) -> str:
    kind = type(processor)
    return f"{kind.__module__}.{kind.__qualname__}"


def _anchors(handle: Any) -> set[int]:
    """Identities of the objects through which this file is read."""
    file = handle.file
    source = file.source
    objects = [handle, file, source, getattr(source, "_resource", None)]
    return {id(o) for o in objects if o is not None}


def _plain_attribute(value: Any, name: str) -> Any:
    """An instance attribute without running a property (which could read data)."""
    try:
        found = inspect.getattr_static(value, name)
    except AttributeError:
        return None
    if isinstance(found, types.MemberDescriptorType):
        return found.__get__(value, type(value))
    if isinstance(found, property) or hasattr(found, "__get__"):
        return None
    return found


def _refers_to(value: Any, anchors: set[int]) -> bool:
    if id(value) in anchors:
        return True
    if not type(value).__module__.startswith("uproot"):
        return False
    return any(id(_plain_attribute(value, name)) in anchors
               for name in ("_file", "_source", "_resource", "source", "file"))


def raised_reading(tb: types.TracebackType | None, anchors: set[int]) -> bool:
    """Whether a frame of the traceback was reading the file these anchors belong to."""
    for frame, _line in traceback.walk_tb(tb):
        if frame.f_code.co_filename == __file__:
            continue
        if any(_refers_to(value, anchors) for value in frame.f_locals.values()):
            return True
    return False


_LIBRARY_ROOTS = tuple(sorted({str(Path(p).resolve()) for key, p in sysconfig.get_paths().items()
                               if key in ("stdlib", "platstdlib", "purelib", "platlib")}))
_FACILITY_ROOT = str(Path(__file__).resolve().parents[1])


@functools.lru_cache(maxsize=65536)
def users_own_file(filename: str) -> bool:
    """A source file of the user's (beside their notebook): neither Python's, nor an installed
    package's, nor the facility's. Kept per name: a run asks it of every module the process
    has imported (thousands, each resolved through the file system)."""
    if filename.startswith("<"):
        return False
    return not str(Path(filename).resolve()).startswith((*_LIBRARY_ROOTS, _FACILITY_ROOT))


def _user_files(processor: Any) -> set[str]:
    files = set()
    for cls in type(processor).__mro__:
        try:
            files.add(str(Path(inspect.getfile(cls)).resolve()))
        except (TypeError, OSError):
            continue
    return files


def _is_user_file(filename: str, own: set[str]) -> bool:
    """The processor's own files (a shipped processor too), or any file of the user's."""
    if not filename.startswith("<") and str(Path(filename).resolve()) in own:
        return True
    return users_own_file(filename)


def user_code_failure(exc: BaseException, processor: Any, chunk: Chunk) -> Failure:
    """The processor's exception with the place in the user's code where it started."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = _user_files(processor)
    mine = [f for f in frames if _is_user_file(f.filename, own)]
    where = None
    if mine:
        last = mine[-1]
        where = f"{last.filename}:{last.lineno} in {last.name}"
        if last.line:
            where += f": {last.line.strip()}"
    # the user's own frames, and where it finally raised if that was in a library
    shown = mine + [f for f in frames[-1:] if f not in mine and f.filename != __file__]
    text = "".join(traceback.format_list(shown[-12:])) + "".join(
        traceback.format_exception_only(type(exc), exc))
    hint = " (likely memory: try a smaller chunk_size)" if isinstance(exc, MemoryError) else ""
    return Failure("user", message=f"the processor failed on chunk {chunk.chunk_id}: "
                   f"{short(exc)}{hint}", where=where, traceback=text)


def chunk_metadata(chunk: Chunk, url: str) -> dict[str, Any]:
    """``events.metadata``: the dataset's metadata (its own keys and totals) and the chunk's."""
    return {**chunk.file.metadata, "dataset": chunk.file.dataset, "filename": chunk.file.name,
            "url": url, "entrystart": chunk.entry_start, "entrystop": chunk.entry_stop}


def build_events(handle: Any, tree: str, start: int, stop: int, schema: type, *,
                 metadata: dict[str, Any] | None = None, preload: list[str] | None = None,
                 accessed: list[Any] | None = None) -> Any:
    """NanoEvents of entries [start, stop) of a tree or RNTuple, read lazily."""
    _keep_base_forms()
    builder = (KeptSchema(schema, (*file_identity(handle.file), tree)) if schema in SCHEMAS.values()
               else schema)
    with quiet_schema_warnings():
        return NanoEventsFactory.from_root(
            handle, treepath=tree, entry_start=start, entry_stop=stop, mode="virtual",
            preload=preload or None, schemaclass=builder, metadata=metadata,
            access_log=accessed).events()


def _events(processor: Any, chunk: Chunk, url: str, handle: Any, preload: list[str],
            accessed: list[Any]) -> Any:
    return build_events(handle, chunk.file.tree, chunk.entry_start, chunk.entry_stop,
                        schema_class(chunk.file.schema, processor),
                        metadata=chunk_metadata(chunk, url), preload=preload, accessed=accessed)


def _call(processor: Any, events: Any) -> Any:
    """The processor, in a frame that holds no handle of the file (see :func:`raised_reading`)."""
    return processor.process(events)


def _process_on(processor: Any, chunk: Chunk, url: str, handle: Any) -> tuple[Any, list[str]]:
    tree = handle[chunk.file.tree]
    if chunk.file_entries >= 0 and tree.num_entries != chunk.file_entries:
        raise ReplicaBroken("damaged", f"the file has {tree.num_entries} entries, the run planned "
                                       f"for {chunk.file_entries}: this replica differs or the "
                                       "file changed after it was inspected")
    key = processor_key(processor)
    preload = sorted(name for name in _columns_touched.get(key, ()) if name in tree)
    accessed: list[Any] = []
    try:
        events = _events(processor, chunk, url, handle, preload, accessed)
    except Exception as exc:  # noqa: BLE001 (building the events reads only this file)
        raise ReplicaBroken(replica_problem(exc), short(exc)) from None
    try:
        output = _call(processor, events)
    except Exception as exc:  # noqa: BLE001 (sorted into the file's fault or the user's below)
        if raised_reading(exc.__traceback__, _anchors(handle)):
            raise ReplicaBroken(replica_problem(exc), short(exc)) from None
        raise UserCodeFailed(user_code_failure(exc, processor, chunk)) from None
    columns = sorted({entry.branch for entry in accessed})
    _columns_touched.setdefault(key, set()).update(columns)
    return output, columns


def process_chunk(processor: Any, chunk: Chunk, timeout: int = 30,
                  open_limit: int | None = None, avoid: frozenset[str] = frozenset()
                  ) -> ChunkDone | Failure:
    """Run a coffea processor over one chunk, from the first replica that can give it."""
    started = time.perf_counter()
    if open_limit is not None:
        set_open_limit(open_limit)
    try:
        (output, columns), url, failed = _each_replica(
            chunk.file, timeout, avoid, lambda url, handle: _process_on(processor, chunk, url, handle))
    except UserCodeFailed as user:
        return user.failure
    except AllReplicasFailed as every:
        return _input_failure(chunk.file, every.failures,
                              f"entries {chunk.entry_start}-{chunk.entry_stop}")
    return ChunkDone(chunk.chunk_id, output, chunk.events, url, f"pid {os.getpid()}",
                     time.perf_counter() - started, tuple(columns), tuple(failed))
