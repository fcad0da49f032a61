"""Giving freed memory back to the operating system between blocks.

Both helpers act on the process's allocator: the pipeline calls :func:`return_freed_memory`
(it only returns free pages); :func:`fix_mmap_threshold` is for whoever owns the process
(the CLI calls it at start; an API user may).

glibc keeps memory freed by one block's tensors in its heap (its mmap threshold rises as
large blocks are freed, so later allocations of that size come from the heap, which it
rarely shrinks). Seen with a one-off probe (RSS after each block) on a 16-block random
Llama of width 1024 read block by block with gptaq-exact: RSS between blocks grew by ~45 MB per block (871 -> 1291 MB, peak 1739 MB);
with ``malloc_trim(0)`` after each block it stayed at 491-494 MB (peak 1283 MB). The call
only returns free pages; it changes no allocation or result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable
from pathlib import Path


def _malloc_trim() -> Callable[[int], int] | None:
    return getattr(_libc(), "malloc_trim", None)  # glibc only


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        return None if name is None else ctypes.CDLL(name)
    except OSError:
        return None


def fix_mmap_threshold(nbytes: int = 8 << 20) -> bool:
    """Serve every allocation of ``nbytes`` or more by mmap, returned to the system when
    freed, instead of letting glibc raise the threshold and keep freed tensors in its heap.
    Measured (benchmarks/big_models.py, GPTQ read block by block): peak RSS 1175 MB with 4
    blocks and 1367 MB with 16 without it (and 1155 / 1045 MB in another run: the heap's
    state decides), 994 / 994 MB with 1 MiB. But at 1 MiB every mid-sized activation of a
    forward is a fresh mapping whose pages fault in again: GPTQ on SmolLM2 took 1.22x the time
    of no setting, 1.06x at 8 MiB (benchmarks/results/allocator.md), which keeps the depth test
    flat (benchmarks/results/big-models.md). True when the allocator took it."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(M_MMAP_THRESHOLD, nbytes))


def return_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_rss_mb() -> float:
    """This process's peak resident set size so far: the kernel's VmHWM of this program's
    memory. Not ru_maxrss, which keeps the high-water mark from before ``exec``: a child
    forked from a 2.8 GB test process reports at least 2.8 GB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
