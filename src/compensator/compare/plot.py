"""``frontier.png``: quality against bits per weight, one line per recipe, FP as a line.

Drawn on a bare matplotlib ``Figure`` with the Agg canvas: no pyplot, so no global state of
the caller's process is touched."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from compensator.compare.report import is_peer, row_name
from compensator.errors import CompensatorError

_LABEL = {"ppl": "perplexity", "kl": "KL(FP || quantized)"}


def check_matplotlib() -> None:
    """Refuse, before any cell runs, a report whose plot could not be drawn."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise CompensatorError(
            "frontier.png needs matplotlib: pip install 'compensator[report]'"
        ) from None


def frontier(
    summary: Sequence[dict[str, Any]],
    fp: dict[str, Any],
    path: Path,
    *,
    measure: str = "ppl",
    title: str = "",
) -> Path:
    """Write the plot to ``path``; the y axis is logarithmic when values span over 10x."""
    check_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = []
    for (label, peer), points in _lines(summary, measure).items():
        points.sort()
        xs, ys, sds = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=[s or 0.0 for s in sds], marker="s" if peer else "o",
                    linestyle="--" if peer else "-", capsize=3, label=label)  # fmt: skip
        values += list(ys)
    fp_value = fp.get(measure) if measure == "ppl" else None
    if fp_value:
        ax.axhline(fp_value, color="black", linestyle=":", label=f"FP ({fp_value:.2f})")
        values.append(fp_value)
    positive = [v for v in values if v and v > 0]
    if positive and max(positive) / min(positive) > 10:
        ax.set_yscale("log")
    ax.set_xlabel("bits per weight (stored)")
    ax.set_ylabel(_LABEL.get(measure, measure) + " (lower is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path


def _lines(
    summary: Sequence[dict[str, Any]], measure: str
) -> dict[tuple[str, bool], list[tuple[float, float, float | None]]]:
    """(bits per weight, mean, sd) per (recipe, is a peer's): a peer toolkit's rows are their
    own line."""
    lines: dict[tuple[str, bool], list[tuple[float, float, float | None]]] = {}
    for s in summary:
        x, y = s["bits_per_weight"]["mean"], s[measure]["mean"]
        if x is not None and y is not None:
            lines.setdefault((row_name(s), is_peer(s)), []).append((x, y, s[measure]["sd"]))
    return lines
