"""glibc's allocator settings for processes that read chunk after chunk.

A chunk allocates tens of megabytes of arrays and frees them all when it ends. With glibc's own
adaptive thresholds the freed heap is handed back to the OS after every chunk, and the next chunk
pays a page fault for each page it touches again: about a third of a 250,000-event chunk's CPU
time went to the kernel zeroing pages. Dask's nannies make it worse (``MALLOC_TRIM_THRESHOLD_``
65536 hands back every freed array). Keeping up to ``cluster.malloc_trim_threshold`` bytes of
freed memory, and serving arrays up to ``cluster.malloc_mmap_threshold`` from it, lets the next
chunk reuse pages already mapped.

The same two numbers reach every process that reads: local workers through their nanny's
``pre-spawn-environ``, pods through the environment their nanny reads it from, and the bench's
comparison processes through :func:`tune_this_process`, so that its ratios compare software,
not allocators.
"""

from __future__ import annotations

import ctypes
import os

from facility.config import ClusterConfig

TRIM_VARIABLE = "MALLOC_TRIM_THRESHOLD_"
MMAP_VARIABLE = "MALLOC_MMAP_THRESHOLD_"
# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _text(value: int | None) -> str | None:
    return None if value is None else str(value)


def allocator_environment(cluster: ClusterConfig) -> dict[str, str | None]:
    """The variables glibc reads when a process starts; None leaves one unset (glibc's adaptive
    value, and in a nanny's ``pre-spawn-environ`` it removes Dask's own)."""
    return {TRIM_VARIABLE: _text(cluster.malloc_trim_threshold),
            MMAP_VARIABLE: _text(cluster.malloc_mmap_threshold)}


def tune_this_process(cluster: ClusterConfig) -> None:
    """This process's allocator set as a worker's: processes it forks inherit the settings, the
    ones it spawns read them from the environment. A threshold left at null is not touched."""
    libc = ctypes.CDLL(None)
    settings = ((TRIM_VARIABLE, _M_TRIM_THRESHOLD, cluster.malloc_trim_threshold),
                (MMAP_VARIABLE, _M_MMAP_THRESHOLD, cluster.malloc_mmap_threshold))
    for variable, parameter, value in settings:
        if value is None:
            continue
        os.environ[variable] = str(value)
        if hasattr(libc, "mallopt"):  # glibc; another C library keeps its own ways
            libc.mallopt(parameter, value)
