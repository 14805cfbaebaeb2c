"""What a process's allocator does with freed memory, seen from the page faults it costs."""

from __future__ import annotations

import os
import resource

import numpy as np

ARRAYS, ARRAY_BYTES = 8, 2 * 2**20
PAGES_PER_ROUND = ARRAYS * ARRAY_BYTES // resource.getpagesize()


def page_faults_of_reallocating(rounds: int = 10) -> int:
    """Minor page faults of this thread while it allocates and frees the same arrays (16 MiB in
    all) ``rounds`` times, as chunk after chunk does: about one round's pages when freed memory
    is kept for the next round, every round's pages when it is handed back to the OS."""
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(rounds):
        kept = [np.ones(ARRAY_BYTES // 8) for _ in range(ARRAYS)]
        del kept
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before


def allocator_report() -> tuple[int, str | None, str | None]:
    """The faults, and the thresholds the process was started with."""
    return (page_faults_of_reallocating(), os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            os.environ.get("MALLOC_MMAP_THRESHOLD_"))


def kept_freed_memory(faults: int) -> bool:
    """Whether the faults are those of memory kept from round to round: fewer than two rounds'
    worth of pages, where handing it back costs every round's."""
    return faults < 2 * PAGES_PER_ROUND
