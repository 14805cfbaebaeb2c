"""``facility bench``: throughput as ratios measured in one run on the same files and cores.

Ways to get the dimuon histogram from the same generated files with N processes:

* ceiling: a raw uproot read of exactly the branches the analysis reads, one task per file;
* hand-written: the same read plus the dimuon selection and histogram in plain numpy, in the
  same processes (what a performance-minded physicist writes without a framework: the
  practical limit);
* coffea: plain ``processor.Runner`` with its defaults (futures executor with N workers), and
  tuned to 500k-event chunks;
* facility: ``facility.run`` on a local facility cluster of N single-threaded workers, with the
  configured chunk size and with 50k-event chunks (what a chunk's fixed cost adds);
* facility without Dask: the workers' own code for a chunk (build its NanoEvents, run the
  processor, merge the output into the process's accumulator) over the same chunks, in the
  same processes as hand-written, with no scheduler, client or task in between. What the
  facility loses to it is the run engine's; what it loses to hand-written is coffea's.

Each is measured from a local file path and over ``root://`` from the embedded XRootD server.
Every way's processes use the facility workers' allocator thresholds, so that the ratios compare
software, not allocators. Absolute rates on a shared machine are noise; the ratios are the
result.

Where a region has an XCache, the raw read of the same branches goes through it twice: cold
(the cache emptied, every block fetched from the region's server) and warm (every block from
the cache's disk), beside the same read straight from the region's server.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from facility.cluster.allocator import allocator_environment, tune_this_process
from facility.cluster.base import backend_for
from facility.config import FacilityConfig, RegionConfig, SampleConfig
from facility.data.access import reader_environment, renew_reader_token
from facility.data.catalog import Dataset, FileEntry, Replica, load_catalog, save_catalog
from facility.data.samples import generate_samples
from facility.data.servers import cache_dir, cached_regions
from facility.embedded.facility import up
from facility.embedded.services import Supervisor
from facility.processing import resident
from facility.processing.dispatch import dask_setup
from facility.processing.plan import Chunk, FileTask, file_tasks, plan_chunks
from facility.processing.processors.dimuon import DimuonProcessor
from facility.processing.reader import inspect_file, process_chunk
from facility.processing.receipts import Failure
from facility.processing.runner import run

BENCH_DATASET = "BenchDrellYan"
TUNED_CHUNK = 500_000
SMALL_CHUNK = 50_000
MUON_COLUMNS = ("Muon_pt", "Muon_eta", "Muon_phi", "Muon_mass", "Muon_charge")


# what a pool process holds: open trees for the raw read and the hand-written analysis; the
# planned chunks of every file for the facility's chunks without Dask, merged as for one run
_ceiling_trees: dict[str, Any] = {}
_planned_chunks: dict[str, list[Chunk]] = {}
ALONE_RUN = "bench-without-dask"


def _open_trees(urls: list[str]) -> None:
    """Pool initializer: every reader holds every file open, as facility workers do."""
    import uproot

    for url in urls:
        _ceiling_trees[url] = uproot.open(url, array_cache=None)["Events"]


def _read_branches(url: str, columns: list[str]) -> int:
    return len(_ceiling_trees[url].arrays(columns))


def handwritten_dimuon(tree: Any, low: float = 40.0, high: float = 200.0,
                       bins: int = 320) -> tuple[int, np.ndarray]:
    """The dimuon histogram with uproot and numpy only: entries read and the bin contents.

    Exactly two muons of opposite charge, weighted by ``genWeight``: the selection of
    :class:`~facility.processing.processors.dimuon.DimuonProcessor`, on flat arrays.
    """
    import awkward as ak

    arrays = tree.arrays([*MUON_COLUMNS, "genWeight"], how=dict)
    counts = ak.to_numpy(ak.num(arrays["Muon_pt"]))
    flat = {name: ak.to_numpy(ak.flatten(arrays[name])).astype(np.float64) for name in MUON_COLUMNS}
    first = (np.cumsum(counts) - counts)[counts == 2]
    second = first + 1
    charge = flat["Muon_charge"]
    opposite = charge[first] + charge[second] == 0
    first, second = first[opposite], second[opposite]
    pt, eta, phi, m = (flat[f"Muon_{n}"] for n in ("pt", "eta", "phi", "mass"))
    energy1 = np.sqrt((pt[first] * np.cosh(eta[first])) ** 2 + m[first] ** 2)
    energy2 = np.sqrt((pt[second] * np.cosh(eta[second])) ** 2 + m[second] ** 2)
    momenta = pt[first] * pt[second] * (np.cos(phi[first] - phi[second])
                                        + np.sinh(eta[first]) * np.sinh(eta[second]))
    mass = np.sqrt(np.maximum(m[first] ** 2 + m[second] ** 2
                              + 2.0 * (energy1 * energy2 - momenta), 0.0))
    weight = ak.to_numpy(arrays["genWeight"])[counts == 2][opposite]
    contents, _ = np.histogram(mass, bins=bins, range=(low, high), weights=weight)
    return len(counts), contents


def _handwritten(url: str) -> int:
    return handwritten_dimuon(_ceiling_trees[url])[0]


def _chunk_outcome(processor: Any, chunk: Chunk) -> Any:
    outcome = process_chunk(processor, chunk)
    if isinstance(outcome, Failure):
        raise RuntimeError(outcome.message)
    return outcome


def warm_reader(tasks: list[FileTask], chunk_size: int) -> None:
    """Hold every file open, know its chunks, and have processed one chunk of each (the
    branches the analysis reads known, the files' forms kept), as a facility worker has after
    a first run."""
    for task in tasks:
        inspected = inspect_file(task, timeout=30)
        if isinstance(inspected, Failure):
            raise RuntimeError(inspected.message)
        _planned_chunks[task.label] = plan_chunks(inspected.info, chunk_size)
        _chunk_outcome(DimuonProcessor(), _planned_chunks[task.label][0])


def _reader_process(tasks: list[FileTask], chunk_size: int) -> None:
    """Pool initializer: a warm reader (:func:`warm_reader`) whose objects are out of the cycle
    collector's sight, as on a worker."""
    warm_reader(tasks, chunk_size)
    dask_setup(None)


def merged_chunks(label: str) -> tuple[int, Any]:
    """Entries read and the accumulator of a file's planned chunks, each processed and merged
    into this process's accumulator by the workers' own code."""
    processor = DimuonProcessor()
    chunks = _planned_chunks[label]
    for chunk in chunks:
        output = _chunk_outcome(processor, chunk).output
        if not resident.absorb(ALONE_RUN, [chunk.chunk_id], output):
            raise RuntimeError(f"{chunk.chunk_id} was merged twice")
    return sum(c.events for c in chunks), resident.collect(ALONE_RUN).output


def _without_dask(label: str) -> int:
    return merged_chunks(label)[0]


def _pool_rate(items: list[str], workers: int, work: Any, *args: list[Any],
               initializer: Any = _open_trees, initargs: tuple[Any, ...] | None = None) -> float:
    """Events per second of ``work(item, ...)`` over every file (named by its URL unless the
    initializer says otherwise), from already open files."""
    with ProcessPoolExecutor(max_workers=workers, initializer=initializer,
                             initargs=initargs or (items,)) as pool:
        list(pool.map(work, items, *args))  # warm: open, page cache
        started = time.perf_counter()
        events = sum(pool.map(work, items, *args))
        return events / (time.perf_counter() - started)


def _first_and_second_pass(urls: list[str], workers: int, columns: list[str]
                           ) -> tuple[float, float]:
    """Events per second of the raw read, first pass (nothing read before, headers aside) and
    second pass, in the same processes."""
    with ProcessPoolExecutor(max_workers=workers, initializer=_open_trees,
                             initargs=(urls,)) as pool:
        rates = []
        for _ in range(2):
            started = time.perf_counter()
            events = sum(pool.map(_read_branches, urls, [columns] * len(urls)))
            rates.append(events / (time.perf_counter() - started))
        return rates[0], rates[1]


def ceiling(urls: list[str], columns: list[str], workers: int) -> float:
    """Events per second of the raw read of the analysis' branches from already open files."""
    return _pool_rate(urls, workers, _read_branches, [columns] * len(urls))


def handwritten(urls: list[str], workers: int) -> float:
    """Events per second of the hand-written uproot + numpy dimuon analysis."""
    return _pool_rate(urls, workers, _handwritten)


def without_dask(tasks: list[FileTask], workers: int, chunk_size: int) -> float:
    """Events per second of the facility's chunks processed in the pool's processes, no Dask."""
    return _pool_rate([t.label for t in tasks], workers, _without_dask,
                      initializer=_reader_process, initargs=(tasks, chunk_size))


def plain_coffea(urls: list[str], workers: int, chunk_size: int | None = None) -> float:
    """Events per second of coffea's Runner: its defaults, or tuned to ``chunk_size``."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    NanoAODSchema.warn_missing_crossrefs = False
    tuning = {"chunksize": chunk_size} if chunk_size else {}
    runner = processor.Runner(executor=processor.FuturesExecutor(workers=workers, status=False),
                              schema=NanoAODSchema, savemetrics=True, **tuning)
    fileset = {BENCH_DATASET: {"files": dict.fromkeys(urls, "Events"),
                               "metadata": {"is_data": False}}}
    started = time.perf_counter()
    _, metrics = runner(fileset, processor_instance=DimuonProcessor(), treename="Events")
    return float(metrics["entries"]) / (time.perf_counter() - started)


def facility_rate(config: FacilityConfig, dataset: str, client: Any,
                  chunk_size: int | None = None) -> tuple[float, list[str]]:
    result = run(DimuonProcessor(), dataset, config=config, client=client, output=False,
                 chunk_size=chunk_size)
    return float(result.summary["events_per_second"]), result.summary["columns_read"]


@dataclass
class Row:
    """Events per second of every way over one source (best of the rounds)."""

    source: str
    ceiling: float = 0.0
    handwritten: float = 0.0
    coffea: float = 0.0
    coffea_tuned: float = 0.0
    facility: float = 0.0
    facility_small_chunks: float = 0.0
    without_dask: float = 0.0

    def ratios(self) -> dict[str, float]:
        return {"facility/hand-written": self.facility / self.handwritten,
                "facility/coffea tuned": self.facility / self.coffea_tuned,
                "facility/coffea": self.facility / self.coffea,
                "facility/ceiling": self.facility / self.ceiling,
                "small/large chunks": self.facility_small_chunks / self.facility,
                "facility/without Dask": self.facility / self.without_dask,
                "without Dask/hand-written": self.without_dask / self.handwritten}

    def fixed_chunk_ms(self, workers: int, chunk_size: int) -> float:
        """What a chunk costs whatever its size, in milliseconds of a worker's time, from the
        two facility runs: the same events in chunks of ``chunk_size`` and of ``SMALL_CHUNK``
        take ``events * a + chunks * f`` seconds of ``workers`` workers each. Everything a
        chunk adds counts (building its events, its task's share, its receipt), as a user's run
        pays it."""
        extra_per_event = 1 / self.facility_small_chunks - 1 / self.facility
        extra_chunks_per_event = 1 / SMALL_CHUNK - 1 / chunk_size
        if extra_chunks_per_event <= 0:
            return float("nan")  # the configured chunks are no larger than the small ones
        return 1000 * workers * extra_per_event / extra_chunks_per_event


def measure(label: str, dataset: Dataset, config: FacilityConfig, client: Any, workers: int,
            repeat: int) -> tuple[Row, list[str]]:
    """Best of ``repeat`` rounds for each way; the ways alternate so drift hits them alike."""
    urls = [f.replicas[0].url for f in dataset.files]
    tasks = file_tasks([dataset], config)
    _, columns = facility_rate(config, dataset.name, client)  # warm workers; learn the branches
    ways = {
        "ceiling": lambda: ceiling(urls, columns, workers),
        "handwritten": lambda: handwritten(urls, workers),
        "coffea": lambda: plain_coffea(urls, workers),
        "coffea_tuned": lambda: plain_coffea(urls, workers, TUNED_CHUNK),
        "facility": lambda: facility_rate(config, dataset.name, client)[0],
        "facility_small_chunks": lambda: facility_rate(config, dataset.name, client,
                                                       SMALL_CHUNK)[0],
        "without_dask": lambda: without_dask(tasks, workers, config.processing.chunk_size),
    }
    row = Row(label)
    for _ in range(repeat):
        for name, way in ways.items():
            setattr(row, name, max(getattr(row, name), way()))
    return row, columns


@dataclass
class CacheRow:
    """The raw read through a region's XCache, cold then warm, and from its server directly."""

    region: str
    cold: float
    warm: float
    direct: float
    cached_bytes: int


def _urls_on(dataset: Dataset, host: str, port: int) -> list[str]:
    return [r.url for f in dataset.files for r in f.replicas
            if r.url.startswith(f"root://{host}:{port}/")]


def measure_cache(config: FacilityConfig, region: RegionConfig, dataset: Dataset,
                  columns: list[str], workers: int, console: Console) -> CacheRow:
    """Empty the cache (stop it, clear its folder, start it again), then read twice."""
    assert region.cache is not None
    assert region.serve is not None
    supervisor = Supervisor(config.state_path)
    supervisor.stop(f"xrootd-{region.name}-cache")
    folder = cache_dir(config, region)
    shutil.rmtree(folder, ignore_errors=True)
    up(config, report=console.print, hub=False, cluster=False)
    through_cache = _urls_on(dataset, region.cache.host, region.cache.xrootd_port)
    cold, warm = _first_and_second_pass(through_cache, workers, columns)
    # the cache's files are sparse: what it holds is the blocks on disk, not their size
    cached = sum(p.stat().st_blocks * 512 for p in folder.rglob("*.root") if p.is_file())
    direct = _urls_on(dataset, region.host, region.serve.xrootd_port)
    return CacheRow(region.name, cold, warm, ceiling(direct, columns, workers), cached)


def _file_dataset(config: FacilityConfig, source: Dataset) -> Dataset:
    """The same files read straight from the region's disk."""
    root = config.region_root(config.regions[0])
    files = [FileEntry(name=f.name, events=f.events, replicas=[Replica(
        region=config.regions[0].name, url=(root / BENCH_DATASET / f.name).resolve().as_uri())])
        for f in source.files]
    return Dataset(name=f"{BENCH_DATASET}-file", tree=source.tree, metadata=source.metadata,
                   files=files)


def bench_command(config: FacilityConfig, args: argparse.Namespace, console: Console,
                  err_console: Console) -> int:
    """Set up, measure with everything but the result on stderr (coffea draws progress bars on
    stdout whatever it is told), then print the table or the JSON on stdout."""
    with contextlib.redirect_stdout(sys.stderr):
        rows, caches, context = _measure_all(config, args, err_console)
    if args.json:
        print(json.dumps({**context, "rows": [
            {**asdict(r), "ratios": r.ratios(),
             "fixed_ms_per_chunk": r.fixed_chunk_ms(context["workers"], context["chunk_size"])}
            for r in rows],
                          "caches": [{**asdict(c), "warm/cold": c.warm / c.cold} for c in caches]},
                         indent=2))
    else:
        _print_table(console, rows, context)
        _print_caches(console, caches, context)
    return 0


def _measure_all(config: FacilityConfig, args: argparse.Namespace, console: Console
                 ) -> tuple[list[Row], list[CacheRow], dict[str, Any]]:
    workers = args.workers or config.cluster.max_workers
    per_file = max(1, args.events // args.files)
    sample = SampleConfig(name=BENCH_DATASET, kind="drell_yan", files=args.files,
                          events_per_file=per_file, cluster_events=SMALL_CHUNK, seed=99)
    config = config.model_copy(update={"samples": [*config.samples, sample]})
    config.cluster = config.cluster.model_copy(update={"min_workers": workers, "max_workers": workers,
                                                       "threads_per_worker": 1})
    generate_samples(config, [BENCH_DATASET], report=console.print)
    up(config, report=console.print, hub=False, cluster=False)
    renew_reader_token(config)
    os.environ.update(reader_environment(config))  # the reading processes started here
    tune_this_process(config.cluster)  # every way reads with the workers' allocator
    catalog = load_catalog(config.catalog_path)
    remote = catalog.get(BENCH_DATASET)
    local = _file_dataset(config, remote)
    save_catalog(catalog.with_dataset(local), config.catalog_path)

    backend = backend_for(config, name="bench")
    backend.stop()
    client = backend.client()
    backend.wait_for_workers(client, workers)
    rows: list[Row] = []
    columns: list[str] = []
    try:
        for label, dataset in (("local file", local), ("root://", remote)):
            row, columns = measure(label, dataset, config, client, workers, max(1, args.repeat))
            rows.append(row)
    finally:
        client.close()
        backend.stop()
    caches = [measure_cache(config, region, remote, columns, workers, console)
              for region in cached_regions(config)]
    context = {"events": args.files * per_file, "workers": workers, "repeat": max(1, args.repeat),
               "chunk_size": config.processing.chunk_size, "branches": columns,
               "allocator": allocator_environment(config.cluster)}
    return rows, caches, context


def _print_table(console: Console, rows: list[Row], context: dict[str, Any]) -> None:
    table = Table("source", "ceiling", "hand-written", "coffea", "coffea tuned", "facility",
                  "facility 50k", "no Dask", "fac/hand", "fac/tuned", "fac/coffea",
                  "fac/ceiling", "50k/default", "fixed ms/chunk", "fac/no Dask", "no Dask/hand",
                  title=f"dimuon over {context['events']:,} events, {context['workers']} worker "
                        f"processes, events per second, best of {context['repeat']}; facility "
                        f"chunks {context['chunk_size']:,} and {SMALL_CHUNK:,}, coffea tuned "
                        f"{TUNED_CHUNK:,}; no Dask: the facility's chunks in the hand-written's "
                        f"processes; branches read: {', '.join(context['branches'])}; "
                        f"allocator: {_allocator_words(context['allocator'])}")
    for row in rows:
        ratios = row.ratios()
        table.add_row(row.source, *(f"{getattr(row, name):,.0f}" for name in (
            "ceiling", "handwritten", "coffea", "coffea_tuned", "facility",
            "facility_small_chunks", "without_dask")),
            f"{ratios['facility/hand-written']:.0%}", f"{ratios['facility/coffea tuned']:.2f}",
            f"{ratios['facility/coffea']:.2f}", f"{ratios['facility/ceiling']:.0%}",
            f"{ratios['small/large chunks']:.0%}",
            f"{row.fixed_chunk_ms(context['workers'], context['chunk_size']):.0f}",
            f"{ratios['facility/without Dask']:.0%}", f"{ratios['without Dask/hand-written']:.0%}")
    Console(width=max(console.width, 230)).print(table)


def _allocator_words(allocator: dict[str, str | None]) -> str:
    return ", ".join(f"{name}={value if value is not None else 'glibc adaptive'}"
                     for name, value in allocator.items())


def _print_caches(console: Console, caches: list[CacheRow], context: dict[str, Any]) -> None:
    if not caches:
        return
    table = Table("region", "through the cache, cold", "through the cache, warm", "warm/cold",
                  "server directly", "warm/direct", "cached on disk",
                  title=f"raw read of the analysis' branches over {context['events']:,} events "
                        f"through each region's XCache, {context['workers']} processes, events "
                        "per second")
    for row in caches:
        table.add_row(row.region, f"{row.cold:,.0f}", f"{row.warm:,.0f}",
                      f"{row.warm / row.cold:.2f}", f"{row.direct:,.0f}",
                      f"{row.warm / row.direct:.2f}", f"{row.cached_bytes / 1e6:,.0f} MB")
    Console(width=max(console.width, 160)).print(table)
