"""``facility bench --scale-sim``: the run engine at thousands of task slots, on one machine.

A slot is a worker thread. Many worker processes with hundreds of threads each run a processor
that *sleeps* for the chunk time, so the machine's cores are not the limit: what is measured is
what limits a run at scale, the client, the scheduler and the engine between them. Each chunk
returns a 2-D histogram of realistic size. The engine is the real one (bundles, accumulators
on the workers, collections, the ledger); only reading data is left out.

Each row runs in a process of its own, so that the client's CPU time and peak memory are that
row's alone, on a fresh cluster of the facility's own kind (TLS, nannies, a scheduler process).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import hist
import psutil
from coffea.processor import ProcessorABC

from facility.cluster.local import LocalBackend
from facility.config import FacilityConfig, load_config
from facility.embedded.services import Supervisor
from facility.processing.dispatch import Dispatcher, close_client, processor_payload
from facility.processing.engine import Request, Run, RunSettings
from facility.processing.plan import Chunk, FileInfo, FileTask
from facility.processing.receipts import ChunkDone

THREADS_PER_WORKER = 500
CHUNKS_PER_FILE = 100
SIM_SCHEME = "sim://emulated"


class SleepingProcessor(ProcessorABC):
    """Sleeps for the chunk time (a slot busy, no CPU) and returns a 2-D histogram.

    Every chunk returns the same histogram object, built once per worker: the engine never
    changes a processor's output in place, and the emulated chunk's own CPU (thousands of
    cores' worth on a couple of real ones) must stay small beside what is measured: carrying
    and merging accumulators of that size.
    """

    def __init__(self, seconds: float, bins: int) -> None:
        self.seconds, self.bins = seconds, bins

    def process(self, events: Any) -> dict[str, hist.Hist]:
        time.sleep(self.seconds)
        return {"h": self._histogram()}

    def _histogram(self) -> hist.Hist:
        made = getattr(self, "_made", None)
        if made is None:
            side = max(1, int(math.sqrt(self.bins)))
            made = hist.Hist.new.Reg(side, 0, 1, name="x").Reg(side, 0, 1, name="y").Weight()
            made.fill(x=[0.5], y=[0.5])
            self._made = made
        return made

    def postprocess(self, accumulator: Any) -> Any:
        return accumulator


def emulated_chunk(processor: Any, chunk: Chunk, timeout: int, open_limit: int,
                   avoid: frozenset[str]) -> ChunkDone:
    """Process a chunk without reading anything (the events object is the chunk itself)."""
    started = time.perf_counter()
    output = processor.process(chunk)
    return ChunkDone(chunk.chunk_id, output, chunk.events, SIM_SCHEME, "",
                     time.perf_counter() - started)


def emulated_request(chunks: int, seconds: float, bins: int, settings: RunSettings) -> Request:
    """A dataset of ``chunks`` one-entry chunks in files of a hundred, known without preflight."""
    infos: dict[str, FileInfo] = {}
    for index in range(math.ceil(chunks / CHUNKS_PER_FILE)):
        entries = min(CHUNKS_PER_FILE, chunks - index * CHUNKS_PER_FILE)
        task = FileTask("emulated", f"file{index:05d}", "Events", (f"{SIM_SCHEME}/{index}",),
                        entries)
        infos[task.label] = FileInfo(task, task.urls[0], entries, tuple(range(entries + 1)))
    tasks = [info.task for info in infos.values()]
    processor = SleepingProcessor(seconds, bins)
    return Request(processor, processor_payload(processor), ["emulated"], tasks,
                   {"emulated": chunks}, settings, inspected=infos)


@dataclass
class Row:
    slots: int
    workers: int
    chunks: int
    chunks_per_second: float
    utilisation: float
    client_cpu_seconds: float
    client_peak_rss_mb: float
    scheduler_cpu_seconds: float
    workers_cpu_seconds: float
    first_merge_seconds: float | None
    wall_seconds: float
    collections: int
    tasks: int


def measure(config: FacilityConfig, slots: int, seconds: float, bins: int, waves: int) -> Row:
    """One row: a fresh cluster of ``slots`` threads, ``waves`` chunks per slot."""
    threads = min(slots, THREADS_PER_WORKER)
    workers = math.ceil(slots / threads)
    backend = _cluster(config, workers, threads)
    client = backend.client()
    try:
        backend.wait_for_workers(client, workers)
        settings = RunSettings(chunk_size=1, skip_bad_input=False, max_skipped_fraction=0.0,
                               retries=config.processing.retries, checkpoint_seconds=1.0,
                               blackhole_failures=config.processing.blackhole_failures,
                               open_timeout=10, open_files=1,
                               max_tasks_per_second=config.processing.max_tasks_per_second,
                               bundle_limit=config.processing.bundle_limit)
        request = emulated_request(slots * waves, seconds, bins, settings)
        run_id = uuid.uuid4().hex[:10]
        scheduler = _cluster_process(config, backend)
        before = (psutil.Process().cpu_times(), scheduler.cpu_times(), _children_cpu(scheduler))
        engine = Run(request, lambda: Dispatcher(client, run_id, 10, 1, work=emulated_chunk),
                     None, None, "")
        started = time.perf_counter()
        engine.execute()
        wall = time.perf_counter() - started
        after = (psutil.Process().cpu_times(), scheduler.cpu_times(), _children_cpu(scheduler))
    finally:
        close_client(client)
        backend.stop()
    ledger = engine.ledger
    _check_exact(engine, slots * waves)
    return Row(slots=slots, workers=workers, chunks=len(ledger.entries),
               chunks_per_second=len(ledger.entries) / wall,
               utilisation=engine.stats.busy_seconds / (slots * wall),
               client_cpu_seconds=_cpu(after[0]) - _cpu(before[0]),
               client_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               scheduler_cpu_seconds=_cpu(after[1]) - _cpu(before[1]),
               workers_cpu_seconds=after[2] - before[2],
               first_merge_seconds=engine.stats.first_merge, wall_seconds=wall,
               collections=engine.stats.collections, tasks=engine.stats.tasks)


def _check_exact(engine: Run, chunks: int) -> None:
    """Every chunk fills its histogram once: the merged result must hold exactly one entry
    per chunk, or the engine lost or double-counted some at scale."""
    entries = int(engine.reducer.accumulator["h"].sum().value)
    if entries != chunks or engine.ledger.count("done") != chunks:
        raise RuntimeError(f"the run merged {entries} entries and settled "
                           f"{engine.ledger.count('done')} chunks, expected {chunks}")


def _cpu(times: Any) -> float:
    return float(times.user + times.system)


def _children_cpu(process: psutil.Process) -> float:
    """CPU seconds of the cluster's worker processes."""
    total = 0.0
    for child in process.children(recursive=True):
        try:
            total += _cpu(child.cpu_times())
        except psutil.NoSuchProcess:
            continue
    return total


def _cluster(config: FacilityConfig, workers: int, threads: int) -> LocalBackend:
    from dask.utils import parse_bytes

    from facility.cluster.limits import WorkerRequest

    request = WorkerRequest(min_workers=workers, max_workers=workers, threads=threads,
                            memory=parse_bytes("2GiB"))
    backend = LocalBackend(config, name=f"scale-sim-{threads * workers}", request=request,
                           idle_timeout=0)
    backend.stop()
    return backend


def _cluster_process(config: FacilityConfig, backend: LocalBackend) -> psutil.Process:
    found = Supervisor(config.state_path).process(backend.service_name)
    if found is None:
        raise RuntimeError(f"the cluster {backend.name!r} has no process")
    return found


def run_rows(config_file: str | None, slot_counts: list[int], seconds: float, bins: int,
             waves: int) -> list[Row]:
    """Every row in a process of its own (see the module's docstring)."""
    rows = []
    for slots in slot_counts:
        command = [sys.executable, "-m", "facility.processing.scale_sim", "--slots", str(slots),
                   "--chunk-seconds", str(seconds), "--hist-bins", str(bins), "--waves",
                   str(waves)] + (["--config", config_file] if config_file else [])
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              env={**os.environ, **WORKER_ENVIRONMENT})
        if done.returncode != 0:
            raise RuntimeError(f"the {slots}-slot row failed:\n{done.stderr[-3000:]}")
        rows.append(Row(**json.loads(done.stdout.strip().splitlines()[-1])))
    return rows


def print_rows(rows: list[Row], args: Any, console: Any, as_json: bool) -> None:
    if as_json:
        console.print_json(json.dumps([asdict(row) for row in rows]))
        return
    from rich.table import Table

    table = Table("slots", "workers", "chunks", "tasks", "chunks/s", "utilisation",
                  "client CPU s", "client peak RSS MB", "scheduler CPU s", "workers CPU s",
                  "first merge s",
                  "collections", "wall s",
                  title=f"emulated slots: {args.chunk_seconds:g} s chunks, 2-D histogram of "
                        f"{args.hist_bins:,} bins, {args.waves} chunks per slot")
    for row in rows:
        table.add_row(f"{row.slots:,}", str(row.workers), f"{row.chunks:,}", f"{row.tasks:,}",
                      f"{row.chunks_per_second:,.0f}", f"{row.utilisation:.1%}",
                      f"{row.client_cpu_seconds:.1f}", f"{row.client_peak_rss_mb:,.0f}",
                      f"{row.scheduler_cpu_seconds:.1f}", f"{row.workers_cpu_seconds:.1f}",
                      "-" if row.first_merge_seconds is None else f"{row.first_merge_seconds:.1f}",
                      str(row.collections), f"{row.wall_seconds:.1f}")
    type(console)(width=max(console.width, 160)).print(table)


# Dask's workers sample every thread's stack every 10 ms for the dashboard's profile: with the
# hundreds of threads an emulating worker has (a real one has a few), that alone would take a
# core. The emulated workers leave it off.
WORKER_ENVIRONMENT = {"DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one row of facility bench --scale-sim")
    parser.add_argument("--slots", type=int, required=True)
    parser.add_argument("--chunk-seconds", type=float, required=True)
    parser.add_argument("--hist-bins", type=int, required=True)
    parser.add_argument("--waves", type=int, required=True)
    parser.add_argument("--config")
    args = parser.parse_args(argv)
    row = measure(load_config(args.config), args.slots, args.chunk_seconds, args.hist_bins,
                  args.waves)
    print(json.dumps(asdict(row)))


if __name__ == "__main__":
    main()
