"""``facility bench --scale``: how long a user waits from ``connect()`` to N workers ready.

Each N gets a fresh cluster (new credentials, scheduler and workers), timed until N workers are
connected, then stopped. That is the wait a physicist sees in a notebook.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from facility.cluster.connect import FacilityCluster, connect
from facility.config import FacilityConfig


def time_to_workers(config: FacilityConfig, n: int) -> float:
    started = time.perf_counter()
    client = connect(f"scale-{n}", workers=n, config=config)
    elapsed = time.perf_counter() - started
    cluster = client.cluster
    if isinstance(cluster, FacilityCluster):
        cluster.close()
    client.close()
    return elapsed


def scale_command(config: FacilityConfig, counts: list[int], console: Console) -> int:
    table = Table("workers", "seconds from connect() to ready", title="cluster start-up, local backend")
    for n in counts:
        table.add_row(str(n), f"{time_to_workers(config, n):.2f}")
    console.print(table)
    return 0
