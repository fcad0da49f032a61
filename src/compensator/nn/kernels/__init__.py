"""Compiled CPU kernels, built once with torch's extension builder (cached outside the
repository, in torch's extensions directory) the first time a packed layer needs one.

If the build fails (no compiler, no ninja) the layers keep to their exact reference path
and say so once. ``COMPENSATOR_KERNELS=0`` turns the kernels off.
"""

from __future__ import annotations

import logging
import os
import time
from functools import cache
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "qgemv.cpp"


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


@cache
def qgemv() -> Any | None:
    """The compiled module (``qgemv_int4``), or None when kernels are off or unavailable."""
    if os.environ.get("COMPENSATOR_KERNELS", "1") == "0":
        return None
    flags = ["-O3"]
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
        if "avx512f" in cpu:
            flags += ["-mavx512f"]
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        module = load(
            name="compensator_qgemv_v4", sources=[str(_SOURCE)], extra_cflags=flags, verbose=False
        )
    except Exception as err:  # any build failure: the reference path still works
        log.warning(
            "could not build the int4 CPU kernel (%s); packed layers use the reference "
            "dequantize-and-matmul path",
            " ".join(str(err).split())[:200],
        )
        return None
    log.debug(
        "int4 CPU kernel ready in %.1fs (avx2: %s, avx512: %s)",
        time.perf_counter() - t0, module.has_avx2(), module.has_avx512(),
    )  # fmt: skip
    return module
