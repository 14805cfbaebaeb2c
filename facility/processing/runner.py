"""``facility.run``: a coffea processor over catalog datasets on the facility's Dask cluster.

A run is wired from stages that each live in a module of their own:

* **plan** (:mod:`.plan`): catalog -> files -> replicas ranked -> preflight -> chunks on cluster
  boundaries;
* **dispatch** (:mod:`.dispatch`): the processor shipped once, preflights and chunks submitted,
  outcomes back in batches (the only code that talks to the cluster);
* **policy** (:mod:`.policy`): what a failure means: next replica, retry, skip, or stop;
* **ledger** and **journal** (:mod:`.ledger`, :mod:`.journal`): every chunk settled exactly once,
  durably, so that ``resume=`` processes only what is missing;
* **reduce** (:mod:`.reduce`): the merged result and exactly which chunks it holds.

:mod:`.engine` keeps the run's state machine between them. This module starts a run or resumes
one, builds its summary and writes its outputs (:mod:`.runfolder`).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import cloudpickle
from coffea.processor import ProcessorABC
from distributed import Client

from facility.cluster.base import backend_for
from facility.cluster.connect import FacilityCluster, connect, job_cluster
from facility.config import FacilityConfig, load_config
from facility.data.access import check_workers_token, renew_reader_token
from facility.data.catalog import checked_schema_name, load_catalog
from facility.errors import UsageError
from facility.processing.dispatch import Dispatcher, close_client, processor_payload
from facility.processing.engine import (
    BadInputError,
    ProcessorError,
    Progress,
    Request,
    Run,
    RunError,
    RunInterrupted,
    RunSettings,
)
from facility.processing.journal import Journal, Replay, now, replay
from facility.processing.ledger import ChunkLedger
from facility.processing.plan import (
    FileTask,
    checked_chunk_size,
    checked_fraction,
    file_tasks,
)
from facility.processing.processors import load_processor
from facility.processing.progress import ProgressOption, live_progress
from facility.processing.reader import processor_key
from facility.processing.runfolder import RunFolder
from facility.processing.schemas import processors_choice

SPEC_VERSION = 1
__all__ = ["BadInputError", "ProcessorError", "Progress", "RunError", "RunInterrupted",
           "RunResult", "run"]


@dataclass
class RunResult:
    output: Any
    summary: dict[str, Any]
    output_dir: Path | None = None
    ledger: ChunkLedger = field(default_factory=ChunkLedger)
    output_error: str | None = None


# ---------------------------------------------------------------------------------------------
# starting, resuming and finishing a run


def _as_processor(processor: ProcessorABC | str) -> ProcessorABC:
    return load_processor(processor) if isinstance(processor, str) else processor


def connected_client() -> Client | None:
    """The client that ``facility.connect()`` made current in this process, if it still runs:
    a run without ``client=`` goes to the cluster the user connected to (and watches on its
    dashboard), not to the facility's shared one."""
    from distributed import default_client

    try:
        current = default_client()
    except ValueError:
        return None
    if isinstance(current.cluster, FacilityCluster) and current.status == "running":
        return current
    return None


def client_for(config: FacilityConfig, client: Client | None) -> tuple[Client, bool]:
    """The given client, else the one ``facility.connect()`` made current, else the batch
    job's own cluster inside a job, else the facility's."""
    client = client or connected_client()
    if client is not None:
        return client, False
    if job_cluster() is not None:
        return connect(config=config), True
    backend = backend_for(config)
    try:
        new = backend.client()
    except OSError as exc:
        raise RunInterrupted(f"cannot reach the Dask scheduler of cluster {backend.name!r}: "
                             f"{exc}; check it with `facility status`") from exc
    try:
        backend.wait_for_workers(new, max(1, config.cluster.min_workers))
    except OSError as exc:
        close_client(new)
        raise RunInterrupted(f"the Dask scheduler of cluster {backend.name!r} went away while "
                             f"the run waited for workers: {exc}") from exc
    return new, True


def _settings(config: FacilityConfig, chunk_size: int | None, on_bad_input: str | None,
              max_skipped_fraction: float | None) -> RunSettings:
    processing = config.processing
    policy_name = on_bad_input or processing.on_bad_input
    if policy_name not in ("fail", "skip"):
        raise UsageError(f"on_bad_input must be 'fail' or 'skip', got {policy_name!r}")
    return RunSettings(
        chunk_size=checked_chunk_size(chunk_size, processing.chunk_size),
        skip_bad_input=policy_name == "skip",
        max_skipped_fraction=checked_fraction(max_skipped_fraction,
                                              processing.max_skipped_fraction),
        retries=processing.retries, checkpoint_seconds=processing.checkpoint_seconds,
        blackhole_failures=processing.blackhole_failures, open_timeout=processing.open_timeout,
        open_files=processing.open_files_per_worker,
        max_tasks_per_second=processing.max_tasks_per_second,
        bundle_limit=processing.bundle_limit)


def _run_name(processor: ProcessorABC, datasets: list[str]) -> str:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    short = type(processor).__name__.removesuffix("Processor").lower()
    return f"{stamp}-{short}-{'+'.join(datasets)[:60]}-{uuid.uuid4().hex[:4]}"


def _output_path(output: bool | Path | str) -> Path | None:
    return None if isinstance(output, bool) else Path(output)


def _new_request(config: FacilityConfig, processor: ProcessorABC | str | None,
                 dataset: str | list[str] | None, settings: RunSettings,
                 output: bool | Path | str, name: str | None, schema: str | None) -> Request:
    if processor is None or not dataset:
        raise UsageError("a run needs a processor and at least one dataset (or resume=NAME)")
    instance = _as_processor(processor)
    names = [dataset] if isinstance(dataset, str) else list(dataset)
    catalog = load_catalog(config.catalog_path)
    datasets = [catalog.get(n) for n in names]
    tasks = with_schema(file_tasks(datasets, config), instance, schema)
    request = Request(instance, processor_payload(instance), names, tasks,
                      {ds.name: ds.events for ds in datasets}, settings)
    if output is not False:
        request.folder = RunFolder.for_new_run(config, name, _output_path(output),
                                               _run_name(instance, names))
    return request


def with_schema(tasks: list[FileTask], processor: ProcessorABC, schema: str | None
                ) -> list[FileTask]:
    """The tasks read with the run's schema, else the processor's, else their catalog's."""
    chosen = (checked_schema_name(schema, "schema") if schema is not None
              else processors_choice(processor))
    if chosen is None:
        return tasks
    return [dataclasses.replace(task, schema=chosen) for task in tasks]


def _spec(request: Request, folder: RunFolder) -> dict[str, Any]:
    settings = request.settings
    return {"version": SPEC_VERSION, "name": folder.name, "created": now(),
            "processor": processor_key(request.processor), "datasets": request.datasets,
            "chunk_size": settings.chunk_size,
            "on_bad_input": "skip" if settings.skip_bad_input else "fail",
            "max_skipped_fraction": settings.max_skipped_fraction,
            "catalog_events": request.catalog_events,
            "files": [task.as_record() for task in request.tasks]}


def _resumed_request(config: FacilityConfig, folder: RunFolder,
                     processor: ProcessorABC | str | None, chunk_size: int | None,
                     on_bad_input: str | None, max_skipped_fraction: float | None) -> Request:
    state = replay(folder.path)
    spec = state.spec
    if chunk_size is not None and chunk_size != spec["chunk_size"]:
        raise UsageError(f"run {folder.name!r} was planned with chunk_size {spec['chunk_size']:,}; "
                         "a resumed run keeps it (start a new run for another)")
    settings = _settings(config, spec["chunk_size"], on_bad_input or spec["on_bad_input"],
                         spec["max_skipped_fraction"] if max_skipped_fraction is None
                         else max_skipped_fraction)
    if processor is not None:
        instance = _as_processor(processor)
        if processor_key(instance) != spec["processor"]:
            raise UsageError(f"run {folder.name!r} was made with processor {spec['processor']}, "
                             f"not {processor_key(instance)}")
        payload = processor_payload(instance)
    else:
        instance, payload = _saved_processor(folder, state), state.processor
    tasks = [FileTask.from_record(record) for record in spec["files"]]
    return Request(instance, payload, spec["datasets"], tasks, spec["catalog_events"], settings,
                   folder, state)


def _saved_processor(folder: RunFolder, state: Replay) -> ProcessorABC:
    try:
        instance = cloudpickle.loads(state.processor)
    except Exception as exc:
        raise UsageError(f"the processor saved with run {folder.name!r} cannot be loaded "
                         f"({type(exc).__name__}: {exc}); pass the processor to resume it") from exc
    if not isinstance(instance, ProcessorABC):
        raise UsageError(f"{folder.path / 'processor.pkl'} does not hold a coffea processor")
    return instance


def _resume_hint(config: FacilityConfig, folder: RunFolder | None) -> str:
    if folder is None:
        return "run it again (a run with an output folder could be resumed instead)"
    reference = folder.reference(config)
    return (f"resume it, processing only what is missing: `facility run --resume {reference}` "
            f"(Python: resume={reference!r})")


def run(processor: ProcessorABC | str | None = None, dataset: str | list[str] | None = None, *,
        config: FacilityConfig | None = None, client: Client | None = None,
        chunk_size: int | None = None, on_bad_input: Literal["fail", "skip"] | None = None,
        max_skipped_fraction: float | None = None, output: bool | Path | str = True,
        progress: ProgressOption = None, name: str | None = None,
        resume: str | Path | None = None, schema: str | None = None) -> RunResult:
    """Run a coffea processor over one or more catalog datasets; returns merged results.

    ``output=True`` keeps the run in a new folder of the configured output area (``name``, or a
    generated one): its journal while it runs, then histograms, plot, summary and ledger. A path
    keeps it there; ``False`` keeps nothing (and the run cannot be resumed).
    ``resume="NAME"`` (a run name or folder) continues an interrupted run: only the chunks its
    journal does not hold are processed, and the result is identical to an uninterrupted run.
    ``schema`` (``"physlite"``, ``"nanoaod"``...) reads every dataset with that event schema;
    else a processor's own ``schema`` attribute does, else each dataset's schema in the catalog.
    ``progress=True`` shows a bar (chunks, events/s, time left) in a notebook or on a terminal;
    ``progress="mass"`` also plots the histogram ``mass`` of the result merged so far; a
    callable receives each :class:`Progress` instead (see :mod:`.progress`).
    Without ``client``, the run goes to the cluster of the client ``facility.connect()`` made
    current, the one whose widget and dashboard the notebook shows (see :func:`client_for`).
    """
    config = config or load_config()
    if resume is not None:
        folder = RunFolder.for_resume(config, resume)
        if folder.complete:
            return _completed(folder, processor)
        request = _resumed_request(config, folder, processor, chunk_size, on_bad_input,
                                   max_skipped_fraction)
    else:
        request = _new_request(config, processor, dataset,
                               _settings(config, chunk_size, on_bad_input, max_skipped_fraction),
                               output, name, schema)
    with live_progress(progress) as report:
        return _execute(config, request, client, report)


def _journal_for(request: Request) -> Journal | None:
    folder = request.folder
    if folder is None:
        return None
    if request.replay is not None:
        return Journal(folder.path, checkpoints=request.replay.checkpoints)
    try:
        return Journal.start(folder.path, _spec(request, folder), request.payload)
    except OSError as exc:
        raise UsageError(f"cannot write the run's folder {folder.path}: {exc}") from exc


TOKEN_SCHEMES = ("root", "roots", "https", "davs")


def _needs_token(request: Request) -> bool:
    return any(url.split("://", 1)[0] in TOKEN_SCHEMES
               for task in request.tasks for url in task.urls)


def _execute(config: FacilityConfig, request: Request, client: Client | None,
             progress: Callable[[Progress], None] | None) -> RunResult:
    renew_reader_token(config)
    journal = _journal_for(request)
    owned: list[Client] = []

    def dispatcher() -> Dispatcher:
        active, mine = client_for(config, client)
        if mine:
            owned.append(active)
        if _needs_token(request):  # a token the servers refuse stops the run before it starts
            check_workers_token(active, config)
        return Dispatcher(active, uuid.uuid4().hex[:10], request.settings.open_timeout,
                          request.settings.open_files)

    engine = Run(request, dispatcher, journal, progress, _resume_hint(config, request.folder))
    try:
        engine.execute()
    except BaseException as failure:
        try:
            engine.stop()
        except OSError as problem:
            failure.add_note(f"the run's checkpoint could not be written: {problem}")
        if isinstance(failure, KeyboardInterrupt) and request.folder is not None:
            failure.add_note(engine.resume_hint)
        raise
    finally:
        for active in owned:
            close_client(active)
        if journal is not None:
            journal.close()
    return _finish(request, engine)


def _check_skipped(engine: Run, settings: RunSettings) -> None:
    ledger = engine.ledger
    skipped, done = ledger.events("skipped"), ledger.events("done")
    total = skipped + done
    if total and skipped / total > settings.max_skipped_fraction:
        listing = "\n".join(f"  - {item['file']} entries {item['entries']}: {item['reason']}"
                            for item in _skipped_items(ledger)[:10])
        raise BadInputError(
            f"{skipped:,} of {total:,} events ({skipped / total:.1%}) were skipped as bad input, "
            f"more than processing.max_skipped_fraction ({settings.max_skipped_fraction:.0%}):\n"
            f"{listing}\nFix or remove these files, or allow more with --max-skipped-fraction "
            f"(Python: max_skipped_fraction=); {engine.resume_hint}")
    if done == 0:
        raise BadInputError("no events were processed: " + (
            "every input was skipped as bad" if skipped else "the datasets' files hold no events"))


def postprocessed(processor: ProcessorABC, accumulator: Any) -> Any:
    """The processor's postprocess of the merged result; as in coffea, a postprocess that
    returns nothing (it changed the accumulator in place, or has nothing to do) keeps it."""
    if accumulator is None:
        return {}
    result = processor.postprocess(accumulator)
    return accumulator if result is None else result


def _finish(request: Request, engine: Run) -> RunResult:
    _check_skipped(engine, request.settings)
    wall = time.perf_counter() - engine.started
    processor = request.processor
    accumulator = engine.reducer.accumulator
    result = postprocessed(processor, accumulator)
    summary = _summary(request, engine, wall)
    summarize = getattr(processor, "summarize", None)
    if callable(summarize) and result:
        summary["analysis"] = summarize(result)
    folder = request.folder
    outcome = RunResult(result, summary, folder.path if folder else None, engine.ledger)
    if folder is not None:
        outcome.output_error = _publish(folder, outcome, engine.resume_hint)
    return outcome


def _publish(folder: RunFolder, outcome: RunResult, resume_hint: str) -> str | None:
    """Write the outputs; a failure is reported, never allowed to lose the result."""
    from facility.processing.output import write_outputs

    try:
        folder.publish(lambda staging: write_outputs(staging, folder.path, outcome.output,
                                                     outcome.summary, outcome.ledger))
    except OSError as exc:
        message = (f"writing the outputs to {folder.path} failed: {type(exc).__name__}: {exc}. "
                   f"The result is returned and kept in {folder.checkpoint}; once there is room, "
                   f"{resume_hint} to write the outputs without processing again")
        outcome.summary.setdefault("outputs", {})["error"] = message
        warnings.warn(message, OutputWarning, stacklevel=3)
        return message
    return None


class OutputWarning(UserWarning):
    """The run's result is complete but its outputs could not be written."""


def _completed(folder: RunFolder, processor: ProcessorABC | str | None) -> RunResult:
    """A run that is already complete: its result read back, nothing processed."""
    import json

    from facility.processing.output import SUMMARY_FILE

    state = replay(folder.path)
    instance = _as_processor(processor) if processor is not None else _saved_processor(folder,
                                                                                       state)
    result = postprocessed(instance, state.accumulator)
    summary = json.loads((folder.path / SUMMARY_FILE).read_text())
    return RunResult(result, summary, folder.path)


# ---------------------------------------------------------------------------------------------
# the summary


def _skipped_items(ledger: ChunkLedger) -> list[dict[str, Any]]:
    items = [{"file": s.task.label, "entries": "all", "events": s.task.catalog_events,
              "reason": s.reason, "stage": "preflight"} for s in ledger.skipped_files.values()]
    items += [{"file": e.chunk.file.label, "entries": [e.chunk.entry_start, e.chunk.entry_stop],
               "events": e.chunk.events, "reason": e.reason, "stage": "processing"}
              for e in ledger.entries.values() if e.state == "skipped"]
    return items


def _per_dataset(request: Request, engine: Run) -> dict[str, dict[str, int]]:
    ledger = engine.ledger
    counts = {}
    for name in request.datasets:
        infos = [i for i in engine.infos.values() if i.task.dataset == name]
        counts[name] = {
            "files": sum(1 for t in request.tasks if t.dataset == name),
            "events_in_catalog": request.catalog_events.get(name, 0),
            "events_in_files": sum(i.entries for i in infos),
            "events_processed": ledger.events("done", name),
            "events_skipped": ledger.events("skipped", name),
            "chunks": sum(1 for e in ledger.entries.values() if e.chunk.file.dataset == name),
        }
    return counts


def _summary(request: Request, engine: Run, wall: float) -> dict[str, Any]:
    ledger = engine.ledger
    events = ledger.events("done")
    resumed = [e for e in ledger.entries.values() if e.resumed and e.state == "done"]
    fresh = events - sum(e.chunk.events for e in resumed)
    processor = request.processor
    return {
        "run": {"name": request.folder.name if request.folder else None,
                "resumed": request.replay is not None},
        "processor": f"{type(processor).__module__}.{type(processor).__qualname__}",
        "datasets": request.datasets,
        "events": events,
        "chunks": {"total": len(ledger.entries), "done": ledger.count("done"),
                   "skipped": ledger.count("skipped"),
                   "retried": sum(1 for e in ledger.entries.values() if e.attempts > 1),
                   "resumed": len(resumed), "duplicates_refused": ledger.duplicates_refused,
                   "redone": ledger.redone},
        "wall_seconds": round(wall, 3),
        "events_per_second": round(fresh / wall, 1) if wall > 0 else 0.0,
        "files": {"inspected": len(engine.preflights), "remembered": engine.remembered,
                  "skipped": len(ledger.skipped_files),
                  "entries_differ_from_catalog": [
                      {"file": i.task.label, "catalog": i.task.catalog_events, "file_has": i.entries}
                      for i in engine.infos.values() if i.differs_from_catalog]},
        "per_dataset": _per_dataset(request, engine),
        "events_skipped": ledger.events("skipped"),
        "skipped": _skipped_items(ledger),
        "columns_read": sorted(engine.stats.columns),
        "replicas_used": dict(engine.stats.replicas_used),
        "endpoints_unhealthy": sorted(engine.health.unhealthy),
        "replicas_failed": engine.health.replica_failures,
        "workers_used": sum(1 for t in engine.health.tallies.values() if t.done),
        "workers_retired": [{"worker": w, "reason": r} for w, r in engine.health.retired.items()],
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
