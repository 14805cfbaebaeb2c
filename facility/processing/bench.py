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


def _read_branches(url: str, columns: list[str]) -> int:
    import uproot

    with uproot.open(url, array_cache=None, object_cache=None) as handle:
        arrays = handle["Events"].arrays(columns)
        return len(arrays)


def ceiling(urls: list[str], columns: list[str], workers: int) -> float:
    """Events per second of the raw read of the analysis' branches."""
    with ProcessPoolExecutor(max_workers=workers) as pool:
        list(pool.map(_read_branches, urls[:workers], [["nMuon"]] * min(workers, len(urls))))
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
    run(DimuonProcessor(), dataset, config=config, client=client, output=False)  # warm workers
    result = run(DimuonProcessor(), dataset, config=config, client=client, output=False)
    return float(result.summary["events_per_second"]), result.summary["columns_read"]


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
    up(config, report=console.print)
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
            fac, columns = facility_rate(config, dataset.name, client)
            ceil = ceiling(urls, columns, workers)
            cof = plain_coffea(urls, workers)
            rows.append((label, ceil, cof, fac))
    finally:
        client.close()
        backend.stop()
    _print_table(console, rows, workers, args.files * per_file, columns)
    return 0


def _print_table(console: Console, rows: list[tuple[str, float, float, float]], workers: int,
                 events: int, columns: list[str]) -> None:
    table = Table("source", "ceiling ev/s", "coffea ev/s", "facility ev/s",
                  "fac/coffea", "fac/ceiling", "coffea/ceiling",
                  title=f"dimuon over {events:,} events, {workers} worker processes; "
                        f"branches read: {', '.join(columns)}")
    for label, ceil, cof, fac in rows:
        table.add_row(label, f"{ceil:,.0f}", f"{cof:,.0f}", f"{fac:,.0f}", f"{fac / cof:.2f}",
                      f"{fac / ceil:.0%}", f"{cof / ceil:.0%}")
    Console(width=max(console.width, 110)).print(table)
