"""One cell of a comparison, in its own process: quantize, save, evaluate, write the row.

A process per cell makes its peak RSS the cell's own (what ``compensator quantize`` would
peak at), and returns every byte to the system between cells. The quantization keeps its
finished blocks in ``<cell>.partial``, so a killed cell resumes at its first unfinished block.

    python -m compensator.compare.worker SPEC.json
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from compensator.compare.cells import Cell, Settings, write_json


def run_cell(spec: dict[str, Any]) -> dict[str, Any]:
    """The row of ``spec``'s cell (``spec``: settings, cell, model_dir, out, threads, keep)."""
    import torch

    from compensator import api
    from compensator.pipeline.memory import peak_rss_mb

    torch.set_num_threads(spec["threads"])
    settings, cell = Settings(**spec["settings"]), Cell(**spec["cell"])
    model_dir, cells = spec["model_dir"], Path(spec["out"]) / "cells"
    evaluate = {
        "data": settings.eval_data,
        "windows": settings.eval_windows,
        "seqlen": settings.seqlen,
        "tasks": settings.tasks,
        "include_path": settings.include_path,
        "limit": settings.limit,
        "progress": False,
    }
    row: dict[str, Any] = {"key": settings.key(cell), "name": cell.name, **asdict(cell)}
    row |= {"threads": spec["threads"], "fixed": spec["fixed"]}  # fixed: no random draw
    if cell.recipe is None:
        res = api.evaluate(model_dir, **evaluate)
        return row | _scores(res) | {"scheme": "FP", "bits_per_weight": None}
    ckpt = cells / cell.name
    t0 = time.perf_counter()
    qm = api.quantize(
        model_dir, cell.recipe, calibration=settings.calib, calib_windows=settings.calib_windows,
        seqlen=settings.seqlen, seed=cell.seed, bits=cell.bits, group_size=settings.group_size,
        device=settings.device, batch_size=settings.batch_size, progress=False,
        resume=cells / f"{cell.name}.partial",
    )  # fmt: skip
    api.save(qm, ckpt, force=True)
    seconds, peak = time.perf_counter() - t0, peak_rss_mb()
    res = api.evaluate(ckpt, **evaluate)
    if not spec["keep"]:
        shutil.rmtree(ckpt, ignore_errors=True)
    return (
        row
        | _scores(res)
        | {
            "scheme": qm.quantization_config["scheme"],
            "bits_per_weight": qm.quantization_config["bits_per_weight"],
            "quantize_seconds": seconds,
            "peak_rss_mb": peak,
            "solve_seconds": qm.report["seconds"]["solve"],
            "pipeline_seconds": qm.report["seconds"],
        }
    )


def _scores(res: Any) -> dict[str, Any]:
    out = res.to_dict()
    return {
        "ppl": out["ppl"],
        "kl": out["kl"],
        "fp_ppl": out["fp_ppl"],
        "tasks": out["tasks"] or {},
        "eval_windows": out["windows"],
        "eval_seconds": out["seconds"],
    }


def main(argv: list[str]) -> int:
    from compensator.errors import CompensatorError

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    spec = json.loads(Path(argv[0]).read_text())
    try:
        row = run_cell(spec)
    except CompensatorError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    write_json(Path(spec["out"]) / "cells" / f"{Cell(**spec['cell']).name}.json", row)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
