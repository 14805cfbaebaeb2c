"""``facility bench --scale``: how long a user waits from ``connect()`` to N workers ready, and a
run over all of them.

Each N gets a fresh cluster (new credentials, scheduler and workers) of single-threaded workers,
timed until N workers are connected; then the dimuon analysis runs over the demo's Drell-Yan
dataset on it, cut into enough chunks for every worker, and the cluster is stopped. That is the
wait a physicist sees in a notebook, and proof that a run uses what it was given.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

from rich.console import Console
from rich.table import Table

from facility.cluster.connect import FacilityCluster, connect
from facility.config import FacilityConfig
from facility.data.samples import generate_samples
from facility.embedded.facility import up
from facility.processing.processors.dimuon import DimuonProcessor
from facility.processing.runner import run

SCALE_DATASET = "DYJetsToMuMu"
DEFAULT_COUNTS = [1, 8, 64]
WORKER_MEMORY = "1GiB"  # threads-light workers: many fit on one machine


@dataclass
class ScaleRow:
    workers: int
    connect_seconds: float
    run_seconds: float
    events: int
    chunks: int
    workers_used: int


def _sized_for(config: FacilityConfig, most: int) -> FacilityConfig:
    """The configuration with room for ``most`` single-threaded workers."""
    cluster = config.cluster.model_copy(update={"max_workers": max(most, config.cluster.max_workers),
                                                "threads_per_worker": 1})
    return config.model_copy(update={"cluster": cluster})


def measure(config: FacilityConfig, n: int, chunk_size: int) -> ScaleRow:
    started = time.perf_counter()
    client = connect(f"scale-{n}", workers=n, threads=1, memory=WORKER_MEMORY, config=config)
    ready = time.perf_counter() - started
    try:
        began = time.perf_counter()
        result = run(DimuonProcessor(), SCALE_DATASET, config=config, client=client, output=False,
                     chunk_size=chunk_size)
        took = time.perf_counter() - began
        used = {entry.worker for entry in result.ledger.entries.values() if entry.worker}
    finally:
        cluster = client.cluster
        if isinstance(cluster, FacilityCluster):
            cluster.close()
        client.close()
    return ScaleRow(n, ready, took, int(result.summary["events"]),
                    int(result.summary["chunks"]["done"]), len(used))


def scale_command(config: FacilityConfig, counts: list[int], console: Console,
                  as_json: bool = False) -> int:
    counts = counts or DEFAULT_COUNTS
    config = _sized_for(config, max(counts))
    setup = Console(stderr=True)  # stdout is for the result alone (--json)
    generate_samples(config, [SCALE_DATASET], report=setup.print)
    up(config, report=setup.print, hub=False, cluster=False)
    events = config.sample(SCALE_DATASET).files * config.sample(SCALE_DATASET).events_per_file
    chunk_size = max(1, events // (2 * max(counts)))  # two chunks a worker at the most workers
    rows = [measure(config, n, chunk_size) for n in counts]
    if as_json:
        print(json.dumps([asdict(row) for row in rows], indent=2))
        return 0
    table = Table("workers", "connect() to ready, s", "run, s", "events", "chunks",
                  "workers that processed chunks",
                  title=f"cluster start-up and a dimuon run over {SCALE_DATASET}, local backend, "
                        "single-threaded workers")
    for row in rows:
        table.add_row(str(row.workers), f"{row.connect_seconds:.1f}", f"{row.run_seconds:.1f}",
                      f"{row.events:,}", str(row.chunks), str(row.workers_used))
    console.print(table)
    return 0
