"""``facility.run``: a coffea processor over catalog datasets on the facility's Dask cluster.

The path of a run: catalog -> replicas ranked (nearest healthy first) -> preflight on the
cluster (entries and cluster boundaries of each file, remembered for re-runs) -> that file's
chunks submitted at once, one task per chunk -> results merged as they finish, each chunk
settled exactly once in the ledger -> postprocess -> outputs (histograms, plot, summary,
ledger) in the user's output area.
"""

from __future__ import annotations

import dataclasses
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from coffea.processor import ProcessorABC, accumulate
from distributed import Client, Future, as_completed
from distributed.client import FutureCancelledError
from distributed.scheduler import KilledWorker

from facility.cluster.base import backend_for
from facility.cluster.connect import connect, job_cluster
from facility.config import FacilityConfig, load_config
from facility.data.catalog import Dataset, load_catalog, rank_replicas
from facility.processing.chunks import Chunk, FileInfo, FileTask, plan_chunks
from facility.processing.ledger import ChunkLedger
from facility.processing.processors import load_processor
from facility.processing.reader import ChunkOutput, InputError, inspect_file, process_chunk

TRANSIENT = (KilledWorker, OSError, TimeoutError)


class RunError(RuntimeError):
    """A run stopped; the message says which input or chunk and what to do."""


@dataclass
class Progress:
    """Where a run stands; handed to the progress callback after every settled chunk."""

    chunks_done: int
    chunks_total: int
    events: int
    elapsed: float
    partial: Any = None

    @property
    def events_per_second(self) -> float:
        return self.events / self.elapsed if self.elapsed > 0 else 0.0


@dataclass
class RunResult:
    output: Any
    summary: dict[str, Any]
    output_dir: Path | None = None
    ledger: ChunkLedger = field(default_factory=ChunkLedger)


def _endpoint_reachable(url: str, timeout: float = 2.0) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return Path(parts.path).exists()
    default_ports = {"root": 1094, "https": 443, "http": 80, "s3": 443}
    port = parts.port or default_ports.get(parts.scheme, 443)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout):
            return True
    except OSError:
        return False


def file_tasks(datasets: Iterable[Dataset], config: FacilityConfig) -> list[FileTask]:
    """Logical files with replicas ranked: nearest region first, unreachable endpoints last."""
    datasets = list(datasets)
    endpoints = {r.endpoint: r.url for ds in datasets for f in ds.files for r in f.replicas}
    unhealthy = {ep for ep, url in endpoints.items() if not _endpoint_reachable(url)}
    tasks = []
    for ds in datasets:
        metadata = ds.metadata.model_dump(exclude_none=True)
        for entry in ds.files:
            ranked = rank_replicas(entry.replicas, config, unhealthy)
            tasks.append(FileTask(ds.name, entry.name, ds.tree, tuple(r.url for r in ranked),
                                  entry.events, metadata))
    return tasks


def _bad_input_message(exc: InputError) -> str:
    return (f"{exc}\nThe run stopped. Fix or remove the file in the catalog, or finish without "
            "it with on_bad_input='skip' (command line: --skip-bad-input).")


def _settle(futures: Iterable[Future]) -> None:
    for future in list(futures):
        future.cancel()


# Preflight results of this process. A re-run over the same files (the usual interactive loop)
# submits its chunks at once; each chunk still checks on the worker that its file has the
# entries the plan was made for, and a file that fails is inspected again next time.
_inspected: dict[tuple, FileInfo] = {}
INSPECTED_KEPT = 100_000


def _inspection_key(task: FileTask) -> tuple:
    return (task.label, task.urls, task.catalog_events)


def _remember(info: FileInfo) -> None:
    if len(_inspected) >= INSPECTED_KEPT:
        _inspected.pop(next(iter(_inspected)))
    _inspected[_inspection_key(info.task)] = info


def _forget(task: FileTask) -> None:
    for key in [k for k in _inspected if k[0] == task.label]:
        del _inspected[key]


def _with_working_replica_first(info: FileInfo) -> FileInfo:
    urls = (info.url, *(u for u in info.task.urls if u != info.url))
    return dataclasses.replace(info, task=dataclasses.replace(info.task, urls=urls))


class _ChunkRunner:
    """Inspects files and processes their chunks in one stream of tasks.

    A file's chunks are submitted as soon as that file is inspected, so the first results
    arrive while later files are still being opened. Results are merged as they finish, and
    what a lost worker took along is retried.
    """

    def __init__(self, client: Client, processor: ProcessorABC, config: FacilityConfig,
                 on_bad_input: str, chunk_size: int,
                 progress: Callable[[Progress], None] | None) -> None:
        self.client, self.processor, self.config = client, processor, config
        self.on_bad_input, self.chunk_size, self.progress = on_bad_input, chunk_size, progress
        self.ledger = ChunkLedger()
        self.accumulator: Any = None
        self.infos: list[FileInfo] = []
        self.skipped: list[dict] = []
        self.columns: set[str] = set()
        self.replicas_used: dict[str, int] = {}
        self.workers_used: set[int] = set()
        self.run_id = uuid.uuid4().hex[:10]
        self.work: dict[str, Chunk | FileTask] = {}
        self.inspections: dict[str, int] = {}
        self.remembered = 0
        self.pending = as_completed(loop=client.loop)
        self.processor_future: Any = None
        self.started = 0.0

    def _key(self, kind: str, attempt: int) -> str:
        return f"{kind}-{self.run_id}-{len(self.work)}-{uuid.uuid4().hex[:6]}-try{attempt}"

    def inspect(self, task: FileTask) -> None:
        attempt = self.inspections[task.label] = self.inspections.get(task.label, 0) + 1
        key = self._key("preflight", attempt)
        self.work[key] = task
        self.pending.add(self.client.submit(inspect_file, task, self.config.processing.open_timeout,
                                            key=key, pure=False))

    def submit(self, chunk: Chunk) -> None:
        key = self._key("chunk", self.ledger.attempt(chunk.chunk_id))
        self.work[key] = chunk
        self.pending.add(self.client.submit(
            process_chunk, self.processor_future, chunk, self.config.processing.open_timeout,
            self.config.processing.open_files_per_worker, key=key, pure=False))

    def plan(self, info: FileInfo) -> None:
        self.infos.append(info)
        for chunk in plan_chunks(_with_working_replica_first(info), self.chunk_size):
            self.ledger.add(chunk)
            self.submit(chunk)

    def run(self, tasks: list[FileTask], started: float) -> None:
        self.started = started
        if not tasks:
            return
        [self.processor_future] = self.client.scatter([self.processor], hash=False, broadcast=True)
        for task in tasks:
            known = _inspected.get(_inspection_key(task))
            if known is None:
                self.inspect(task)
            else:
                self.remembered += 1
                self.plan(known)
        try:
            for future in self.pending:
                item = self.work.pop(future.key)
                try:
                    self._settle_future(future, item)
                finally:
                    future.release()
        except BaseException:
            _settle(self.pending.futures)
            raise
        order = {task.label: i for i, task in enumerate(tasks)}
        self.infos.sort(key=lambda info: order[info.task.label])

    def _settle_future(self, future: Future, item: Chunk | FileTask) -> None:
        try:
            result = future.result()
        except InputError as exc:
            self._bad_input(exc, item)
        except TRANSIENT as exc:
            self._retry_or_fail(exc, item)
        except FutureCancelledError:
            return
        except Exception as exc:
            what = (f"the processor failed on chunk {item.chunk_id}" if isinstance(item, Chunk)
                    else f"inspecting {item.label} failed")
            raise RunError(f"{what}: {type(exc).__name__}: {exc}") from exc
        else:
            if isinstance(item, Chunk):
                self._merge(result)
            else:
                _remember(result)
                self.plan(result)

    def _merge(self, out: ChunkOutput) -> None:
        if not self.ledger.settle_done(out.chunk_id, replica=out.replica,
                                       worker=str(out.worker_pid), seconds=out.seconds):
            return
        self.accumulator = out.output if self.accumulator is None else accumulate(
            [self.accumulator, out.output])
        self.columns.update(out.columns)
        self.replicas_used[out.replica] = self.replicas_used.get(out.replica, 0) + 1
        self.workers_used.add(out.worker_pid)
        if self.progress:
            self.progress(Progress(self.ledger.count("done") + self.ledger.count("skipped"),
                                   len(self.ledger.entries), self.ledger.events("done"),
                                   time.perf_counter() - self.started, self.accumulator))

    def _bad_input(self, exc: InputError, item: Chunk | FileTask) -> None:
        _forget(item.file if isinstance(item, Chunk) else item)
        if self.on_bad_input == "fail":
            raise RunError(_bad_input_message(exc)) from None
        if isinstance(item, Chunk):
            self.ledger.settle_skipped(item.chunk_id, str(exc))
        else:
            self.skipped.append({"file": exc.file, "url": exc.url, "entries": "all",
                                 "reason": exc.reason, "stage": "preflight"})

    def _retry_or_fail(self, exc: BaseException, item: Chunk | FileTask) -> None:
        if isinstance(item, FileTask):
            attempts, what = self.inspections[item.label], f"inspecting {item.label}"
        else:
            entry = self.ledger.entries[item.chunk_id]
            if entry.state != "pending":
                return
            attempts, what = entry.attempts, f"chunk {item.chunk_id}"
        if attempts <= self.config.processing.retries:
            if isinstance(item, FileTask):
                self.inspect(item)
            else:
                self.submit(item)
            return
        raise RunError(f"{what} failed {attempts} times, last: "
                       f"{type(exc).__name__}: {exc}") from exc


def _as_processor(processor: ProcessorABC | str) -> ProcessorABC:
    return load_processor(processor) if isinstance(processor, str) else processor


def _client_for(config: FacilityConfig, client: Client | None) -> tuple[Client, bool]:
    """The given client, else the batch job's own cluster inside a job, else the facility's."""
    if client is not None:
        return client, False
    if job_cluster() is not None:
        return connect(config=config), True
    backend = backend_for(config)
    new = backend.client()
    backend.wait_for_workers(new, max(1, config.cluster.min_workers))
    return new, True


def run(processor: ProcessorABC | str, dataset: str | list[str], *,
        config: FacilityConfig | None = None, client: Client | None = None,
        chunk_size: int | None = None, on_bad_input: str | None = None,
        output: bool | Path = True, progress: Callable[[Progress], None] | None = None,
        name: str | None = None) -> RunResult:
    """Run a coffea processor over one or more catalog datasets; returns merged results.

    ``output=True`` writes histograms, plot, summary and ledger to a new folder of the
    configured output area, a path writes there, ``False`` writes nothing.
    """
    config = config or load_config()
    processor = _as_processor(processor)
    policy = on_bad_input or config.processing.on_bad_input
    if policy not in ("fail", "skip"):
        raise RunError(f"on_bad_input must be 'fail' or 'skip', got {policy!r}")
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    catalog = load_catalog(config.catalog_path)
    datasets = [catalog.get(n) for n in names]
    client, owned = _client_for(config, client)
    started = time.perf_counter()
    runner = _ChunkRunner(client, processor, config, policy,
                          chunk_size or config.processing.chunk_size, progress)
    try:
        runner.run(file_tasks(datasets, config), started)
    finally:
        if owned:
            client.close()
    runner.ledger.check_complete()
    wall = time.perf_counter() - started
    result = processor.postprocess(runner.accumulator) if runner.accumulator is not None else {}
    summary = _summary(names, processor, runner, wall, catalog_events={
        ds.name: ds.events for ds in datasets})
    summarize = getattr(processor, "summarize", None)
    if callable(summarize) and result:
        summary["analysis"] = summarize(result)
    out_dir = None
    if output:
        from facility.processing.output import save_run

        out_dir = Path(output) if isinstance(output, Path | str) and not isinstance(output, bool) \
            else config.output_path / (name or _run_name(processor, names))
        save_run(out_dir, result, summary, runner.ledger)
    return RunResult(result, summary, out_dir, runner.ledger)


def _run_name(processor: ProcessorABC, datasets: list[str]) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    short = type(processor).__name__.removesuffix("Processor").lower()
    return f"{stamp}-{short}-{'+'.join(datasets)[:60]}-{uuid.uuid4().hex[:4]}"


def _summary(names: list[str], processor: ProcessorABC, runner: _ChunkRunner, wall: float,
             catalog_events: dict[str, int]) -> dict[str, Any]:
    ledger, infos, skipped = runner.ledger, runner.infos, list(runner.skipped)
    for entry in ledger.entries.values():
        if entry.state == "skipped":
            skipped.append({"file": entry.chunk.file.label, "url": entry.chunk.file.urls[0],
                            "entries": [entry.chunk.entry_start, entry.chunk.entry_stop],
                            "reason": entry.reason, "stage": "processing"})
    per_dataset: dict[str, dict[str, int]] = {}
    for name in names:
        done = [e for e in ledger.entries.values() if e.chunk.file.dataset == name]
        per_dataset[name] = {
            "files": sum(1 for i in infos if i.task.dataset == name),
            "events_in_catalog": catalog_events.get(name, 0),
            "events_processed": sum(e.chunk.events for e in done if e.state == "done"),
            "events_skipped": sum(e.chunk.events for e in done if e.state == "skipped"),
            "chunks": len(done),
        }
    events = ledger.events("done")
    return {
        "processor": f"{type(processor).__module__}.{type(processor).__qualname__}",
        "datasets": names,
        "events": events,
        "chunks": {"total": len(ledger.entries), "done": ledger.count("done"),
                   "skipped": ledger.count("skipped"),
                   "retried": sum(1 for e in ledger.entries.values() if e.attempts > 1),
                   "duplicates_refused": ledger.duplicates_refused},
        "wall_seconds": round(wall, 3),
        "events_per_second": round(events / wall, 1) if wall > 0 else 0.0,
        "files": {"inspected": len(runner.inspections), "remembered": runner.remembered},
        "per_dataset": per_dataset,
        "skipped": skipped,
        "columns_read": sorted(runner.columns),
        "replicas_used": runner.replicas_used,
        "workers_used": len(runner.workers_used),
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
