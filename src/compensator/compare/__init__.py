"""``compensator compare``: recipes x bits x calibration seeds, each cell quantized and
evaluated in its own process (resumable), then ``report.md``, ``report.json`` and
``frontier.png`` (docs/compare.md)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compensator.compare.cells import Settings, write_json, write_text
from compensator.compare.report import markdown, noise, summarize
from compensator.errors import CompensatorError

log = logging.getLogger(__name__)

__all__ = ["Settings", "compare", "read_peers"]


def read_peers(paths: list[str]) -> list[dict[str, Any]]:
    """Rows a peer harness wrote (``{"rows": [...]}``; benchmarks/peers/), each tagged with its
    toolkit as ``source``."""
    rows = []
    for path in paths:
        try:
            found = json.loads(Path(path).read_text())["rows"]
            missing = {k for row in found for k in ("recipe", "source", "ppl") if k not in row}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CompensatorError(
                f"--peers {path} cannot be read as a peer results file ({type(e).__name__}: "
                f"{e}); pass a JSON written by benchmarks/peers/run.py"
            ) from None
        if missing:
            raise CompensatorError(f"--peers {path}: rows lack {', '.join(sorted(missing))}")
        rows += found
    return rows


def compare(
    settings: Settings,
    recipes: list[str],
    bits: list[int | None],
    seeds: list[int],
    out: str | Path,
    *,
    threads: int,
    peers: list[str] | None = None,
    measure: str = "ppl",
    keep_checkpoints: bool = False,
    progress: bool = True,
    command: str = "",
) -> dict[str, Any]:
    """Run the grid (finished cells are reused), write the three report files into ``out``
    and return the report's JSON."""
    from compensator.compare.plot import check_matplotlib, frontier
    from compensator.compare.run import run_compare
    from compensator.tasks import check_tasks, task_manager

    check_matplotlib()  # before hours of cells, not after
    recipes, bits, seeds = (
        _unique(recipes, "recipes"),
        _unique(bits, "bits"),
        _unique(seeds, "seeds"),
    )
    out = Path(out).resolve()
    if out.exists() and not out.is_dir():
        raise CompensatorError(f"--out {out} is a file; name a directory for the report")
    peer_rows = read_peers(peers or [])
    if settings.tasks:
        manager = task_manager(settings.include_path, settings.tasks)
        check_tasks(settings.tasks, manager, settings.limit)
    t0 = time.perf_counter()
    rows = run_compare(
        settings, recipes, bits, seeds, out, threads=threads,
        keep_checkpoints=keep_checkpoints, progress=progress,
    )  # fmt: skip
    fp, cells = rows[0], rows[1:]
    summary = summarize([*cells, *peer_rows])
    notes = noise(summary)
    protocol = _protocol(settings, fp, threads)
    report = {"protocol": protocol, "settings": asdict(settings), "fp": fp, "cells": cells,
              "peers": peer_rows, "summary": summary, "noise": notes, "command": command}  # fmt: skip
    write_json(out / "report.json", report)
    write_text(out / "report.md", markdown(summary, fp, notes, protocol, command))
    frontier(summary, fp, out / "frontier.png", measure=measure, title=Path(settings.model).name)
    log.info("report of %d cells written to %s in %.1fs", len(rows), out, time.perf_counter() - t0)
    return report


def _unique(values: list[Any], what: str) -> list[Any]:
    """``values`` without repeats: a repeated recipe, width or seed would run the same cell
    again and count its copies as separate runs in the mean and the spread."""
    unique = list(dict.fromkeys(values))
    if len(unique) < len(values):
        log.warning("--%s lists %s more than once; each runs once", what,
                    ", ".join(str(v) for v in unique if values.count(v) > 1))  # fmt: skip
    return unique


def _protocol(settings: Settings, fp: dict[str, Any], threads: int) -> str:
    windows = fp.get("eval_windows")
    tasks = f"; tasks: {', '.join(settings.tasks)}" if settings.tasks else ""
    limit = f" (first {settings.limit} documents)" if settings.limit else ""
    return (
        f"Model `{settings.model}`; calibration: {settings.calib or 'default'}, "
        f"{settings.calib_windows} x {settings.seqlen} tokens, seeded per row; evaluation: "
        f"{settings.eval_data or 'default'}, {windows} windows of {settings.seqlen} tokens "
        f"(FP ppl {fp['ppl']:.2f}){tasks}{limit}; {threads} CPU threads; every cell in its own "
        "process (peak RSS: the quantization's)."
    )
