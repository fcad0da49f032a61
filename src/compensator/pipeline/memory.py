"""Giving freed memory back to the operating system between blocks.

glibc keeps memory freed by one block's tensors in its heap (its mmap threshold rises as
large blocks are freed, so later allocations of that size come from the heap, which it
rarely shrinks). Measured on a 16-block random Llama of width 1024 read block by block with
gptaq-exact: RSS between blocks grew by ~45 MB per block (871 -> 1291 MB, peak 1739 MB);
with ``malloc_trim(0)`` after each block it stayed at 491-494 MB (peak 1283 MB). The call
only returns free pages; it changes no allocation or result.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim  # glibc only
    except (OSError, AttributeError):
        return None


def return_freed_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
