"""Where a pipeline run's time went, and what its per-block steps reported."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class PipelineReport:
    """Where the time went: ``forward`` is calibration forward passes (``statistics``, the
    accumulation of X^T X and friends, is counted apart), ``solve`` the rounding maths,
    ``hooks`` the per-block steps (training); ``per_block`` what the hooks reported. In a
    data-parallel run ``reduce`` is the summing of statistics over the ranks and ``share`` the
    waiting for and receiving of what other ranks rounded."""

    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "capture",
                "resume",
                "forward",
                "statistics",
                "reduce",
                "solve",
                "share",
                "train",
                "total",
            ),
            0.0,
        )
    )
    blocks: int = 0
    per_block: dict[str, list[Any]] = field(default_factory=dict)
    quantized_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        seconds = dict(self.seconds)
        # timed nested inside the passes
        seconds["forward"] -= seconds["statistics"] + seconds["reduce"]
        seconds["solve"] -= seconds["share"]
        out: dict[str, Any] = {
            "seconds": seconds,
            "blocks": self.blocks,
            "layers": len(self.quantized_layers),
        }
        return {**out, **self.per_block}


class Timer:
    """Adds the seconds spent inside it to ``report.seconds[key]``."""

    def __init__(self, report: PipelineReport, key: str) -> None:
        self.report, self.key = report, key

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.report.seconds[self.key] += time.perf_counter() - self.t0


def log_report(report: PipelineReport) -> None:
    s = report.seconds
    log.info(
        "quantized %d layers in %d blocks in %.1fs (capture %.1fs, forward passes %.1fs, "
        "statistics %.1fs, training %.1fs, rounding maths %.1fs%s)",
        len(report.quantized_layers),
        report.blocks,
        s["total"],
        s["capture"],
        s["forward"] - s["statistics"] - s["reduce"],
        s["statistics"],
        s["train"],
        s["solve"] - s["share"],
        f", over ranks: reduce {s['reduce']:.1f}s, share {s['share']:.1f}s"
        if s["reduce"] or s["share"]
        else "",
    )
