"""Compiled CPU kernels, built once with torch's extension builder (cached outside the
repository, in torch's extensions directory) the first time something needs one:

* ``qgemv()``: the packed int4 GEMV of ``QuantLinear`` at decode (``qgemv.cpp``);
* ``gptq_columns()``: GPTQ's per-column recursion inside a block (``gptq.cpp``).

If a build fails (no compiler, no ninja) the callers keep to their reference path in Python
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

_HERE = Path(__file__).parent


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def _build(name: str, source: str, what: str, extra: list[str]) -> Any | None:
    """The module built from ``source``, or None (logged once per kernel) when kernels are
    off or the build fails."""
    if os.environ.get("COMPENSATOR_KERNELS", "1") == "0":
        return None
    flags = ["-O3", *extra]
    cpu = _cpu_flags()
    if {"avx2", "fma"} <= cpu:
        flags += ["-mavx2", "-mfma"]
        if "avx512f" in cpu:
            flags += ["-mavx512f"]
    t0 = time.perf_counter()
    try:
        from torch.utils.cpp_extension import load

        module = load(name=name, sources=[str(_HERE / source)], extra_cflags=flags, verbose=False)
    except Exception as err:  # any build failure: the reference path still works
        log.warning(
            "could not build the %s (%s); using the reference path in Python",
            what, " ".join(str(err).split())[:200],
        )  # fmt: skip
        return None
    log.debug("%s ready in %.1fs", what, time.perf_counter() - t0)
    return module


@cache
def qgemv() -> Any | None:
    """``qgemv_int4`` and ``dequant_int4`` (and ``has_avx2``/``has_avx512``), or None."""
    return _build("compensator_qgemv_v4", "qgemv.cpp", "int4 CPU kernel", [])


@cache
def gptq_columns() -> Any | None:
    """``gptq_columns``, or None. Without contraction, so it rounds as the Python loop does."""
    return _build("compensator_gptq_v2", "gptq.cpp", "GPTQ column kernel", ["-ffp-contract=off"])
