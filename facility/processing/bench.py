"""``facility bench``: throughput as ratios measured in one run on the same files and cores.

Three ways to get the dimuon histogram from the same generated files with N processes:

* ceiling: a raw uproot read of exactly the branches the analysis reads, one task per file;
* coffea: plain ``processor.Runner`` with its defaults (futures executor with N workers);
* facility: ``facility.run`` on a local facility cluster of N single-threaded workers.

Each is measured from a local file path and over ``root://`` from the embedded XRootD server.
Absolute rates on a shared machine are noise; the ratios are the result.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from rich.console import Console
from rich.table import Table

from facility.cluster.base import backend_for
from facility.config import FacilityConfig, SampleConfig
from facility.data.catalog import Dataset, FileEntry, Replica, load_catalog, save_catalog
from facility.data.samples import generate_samples
from facility.embedded.facility import up
from facility.processing.processors.dimuon import DimuonProcessor
from facility.processing.runner import run

BENCH_DATASET = "BenchDrellYan"


_ceiling_trees: dict[str, Any] = {}


def _open_trees(urls: list[str]) -> None:
    """Pool initializer: every reader holds every file open, as facility workers do."""
    import uproot

    for url in urls:
        _ceiling_trees[url] = uproot.open(url, array_cache=None)["Events"]


def _read_branches(url: str, columns: list[str]) -> int:
    return len(_ceiling_trees[url].arrays(columns))


def ceiling(urls: list[str], columns: list[str], workers: int) -> float:
    """Events per second of the raw read of the analysis' branches from already open files."""
    with ProcessPoolExecutor(max_workers=workers, initializer=_open_trees,
                             initargs=(urls,)) as pool:
        list(pool.map(_read_branches, urls, [columns] * len(urls)))  # warm: open, page cache
        started = time.perf_counter()
        events = sum(pool.map(_read_branches, urls, [columns] * len(urls)))
        return events / (time.perf_counter() - started)


def plain_coffea(urls: list[str], workers: int) -> float:
    """Events per second of coffea's Runner with its defaults."""
    from coffea import processor
    from coffea.nanoevents import NanoAODSchema

    NanoAODSchema.warn_missing_crossrefs = False
    runner = processor.Runner(executor=processor.FuturesExecutor(workers=workers),
                              schema=NanoAODSchema, savemetrics=True)
    fileset = {BENCH_DATASET: {"files": dict.fromkeys(urls, "Events"),
                               "metadata": {"is_data": False}}}
    started = time.perf_counter()
    _, metrics = runner(fileset, processor_instance=DimuonProcessor(), treename="Events")
    return float(metrics["entries"]) / (time.perf_counter() - started)


def facility_rate(config: FacilityConfig, dataset: str, client: Any) -> tuple[float, list[str]]:
    result = run(DimuonProcessor(), dataset, config=config, client=client, output=False)
    return float(result.summary["events_per_second"]), result.summary["columns_read"]


def measure(urls: list[str], dataset: str, config: FacilityConfig, client: Any, workers: int,
            repeat: int) -> tuple[float, float, float, list[str]]:
    """Best of ``repeat`` rounds for each way; the three alternate so drift hits them alike."""
    _, columns = facility_rate(config, dataset, client)  # warm workers; learn the branches
    ceil = cof = fac = 0.0
    for _ in range(repeat):
        ceil = max(ceil, ceiling(urls, columns, workers))
        cof = max(cof, plain_coffea(urls, workers))
        fac = max(fac, facility_rate(config, dataset, client)[0])
    return ceil, cof, fac, columns


def _file_dataset(config: FacilityConfig, source: Dataset) -> Dataset:
    """The same files read straight from the region's disk."""
    root = config.region_root(config.regions[0])
    files = [FileEntry(name=f.name, events=f.events, replicas=[Replica(
        region=config.regions[0].name, url=(root / BENCH_DATASET / f.name).resolve().as_uri())])
        for f in source.files]
    return Dataset(name=f"{BENCH_DATASET}-file", tree=source.tree, metadata=source.metadata,
                   files=files)


def bench_command(config: FacilityConfig, args: argparse.Namespace, console: Console) -> int:
    workers = args.workers or config.cluster.max_workers
    per_file = max(1, args.events // args.files)
    sample = SampleConfig(name=BENCH_DATASET, kind="drell_yan", files=args.files,
                          events_per_file=per_file, seed=99)
    config = config.model_copy(update={"samples": [*config.samples, sample]})
    config.cluster = config.cluster.model_copy(update={"min_workers": workers, "max_workers": workers,
                                                       "threads_per_worker": 1})
    generate_samples(config, [BENCH_DATASET], report=console.print)
    up(config, report=console.print, hub=False)
    catalog = load_catalog(config.catalog_path)
    remote = catalog.get(BENCH_DATASET)
    local = _file_dataset(config, remote)
    save_catalog(catalog.with_dataset(local), config.catalog_path)

    backend = backend_for(config, name="bench")
    backend.stop()
    client = backend.client()
    backend.wait_for_workers(client, workers)
    rows = []
    try:
        for label, dataset in (("local file", local), ("root://", remote)):
            urls = [f.replicas[0].url for f in dataset.files]
            ceil, cof, fac, columns = measure(urls, dataset.name, config, client, workers,
                                              max(1, args.repeat))
            rows.append((label, ceil, cof, fac))
    finally:
        client.close()
        backend.stop()
    _print_table(console, rows, workers, args.files * per_file, columns, max(1, args.repeat))
    return 0


def _print_table(console: Console, rows: list[tuple[str, float, float, float]], workers: int,
                 events: int, columns: list[str], repeat: int) -> None:
    table = Table("source", "ceiling ev/s", "coffea ev/s", "facility ev/s",
                  "fac/coffea", "fac/ceiling", "coffea/ceiling",
                  title=f"dimuon over {events:,} events, {workers} worker processes, best of {repeat}; "
                        f"branches read: {', '.join(columns)}")
    for label, ceil, cof, fac in rows:
        table.add_row(label, f"{ceil:,.0f}", f"{cof:,.0f}", f"{fac:,.0f}", f"{fac / cof:.2f}",
                      f"{fac / ceil:.0%}", f"{cof / ceil:.0%}")
    Console(width=max(console.width, 110)).print(table)
