"""``compensator compare``: run a grid of cells (each resumable), then write the report."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from compensator.compare.cells import Cell, Settings, cell_file, finished, grid, write_json
from compensator.errors import CompensatorError, RunInterrupted

log = logging.getLogger(__name__)


class CellsFailed(CompensatorError):
    """Some cells failed (their reasons in the message); the others' rows are kept."""

    exit_code = 1


def check_recipes(recipes: list[str], bits: list[int | None], group_size: int | None) -> dict:
    """Fail before any cell runs on a recipe or override that cannot work; which recipes
    draw anything at random (so that seeds matter)."""
    from compensator.recipes.recipe import load_recipe

    seeded = {}
    for name in recipes:
        base = load_recipe(name)
        for b in bits:
            base.with_overrides(bits=b, group_size=group_size)
        seeded[name] = base.draws_at_random()
    return seeded


def model_dir(model: str, out: Path) -> str:
    """A local safetensors directory of ``model`` every cell reads: the model itself when it
    is one, else a plain copy written once into ``<out>/model`` (a GGUF or hub model is
    dequantized or downloaded once, not once per cell)."""
    path = Path(model).expanduser()
    if path.is_dir() and any(path.glob("*.safetensors")) and not _has_qconfig(path):
        return str(path.resolve())
    target = out / "model"
    if (target / "config.json").is_file():
        return str(target)
    from compensator.io.atomic import atomic_dir
    from compensator.models.loading import load_model, save_plain

    t0 = time.perf_counter()
    loaded = load_model(model)
    with atomic_dir(target) as tmp:
        save_plain(loaded, tmp)
    log.info(
        "wrote %s as a safetensors copy in %s (%.1fs)", model, target, time.perf_counter() - t0
    )
    return str(target)


def _has_qconfig(path: Path) -> bool:
    try:
        return "quantization_config" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def run_compare(
    settings: Settings,
    recipes: list[str],
    bits: list[int | None],
    seeds: list[int],
    out: Path,
    *,
    threads: int,
    keep_checkpoints: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Every cell's row (FP first), running the cells not finished with these settings."""
    seeded = check_recipes(recipes, bits, settings.group_size)
    cells = [Cell(None), *grid(recipes, bits, seeds, seeded)]
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in cells:
        row = finished(out, cell, settings.key(cell))
        if row is None:
            todo.append(cell)
        else:
            rows[cell.name] = row
    log.info("%d cells: %d finished before, %d to run", len(cells), len(rows), len(todo))
    failed = []
    if todo:
        source = model_dir(settings.model, out)
        for cell in tqdm(todo, desc="compare", unit="cell", disable=not progress):
            fixed = cell.recipe is None or not seeded[cell.recipe]
            row, error = _run_one(settings, cell, source, out, threads, keep_checkpoints, fixed)
            if error:
                failed.append(f"{cell.name}: {error}")
                continue
            rows[cell.name] = row
            log.info("%s: ppl %.3f (%.0fs)", cell.name, row["ppl"], row.get("quantize_seconds", 0))
    if failed:
        raise CellsFailed(
            f"{len(failed)} of {len(cells)} cells failed (the others are kept; rerun to retry): "
            + "; ".join(failed)
        )
    return [rows[c.name] for c in cells]


def _run_one(
    settings: Settings, cell: Cell, source: str, out: Path, threads: int, keep: bool, fixed: bool
) -> tuple[dict[str, Any], str | None]:
    spec_path = out / "cells" / f"{cell.name}.spec.json"
    spec = {"settings": asdict(settings), "cell": asdict(cell), "model_dir": source,
            "out": str(out), "threads": threads, "keep": keep, "fixed": fixed}  # fmt: skip
    write_json(spec_path, spec)
    log_path = out / "cells" / f"{cell.name}.log"
    env = {**os.environ, "TQDM_DISABLE": "1"}
    t0 = time.perf_counter()
    try:
        with log_path.open("w") as log_file:
            done = subprocess.run(
                [sys.executable, "-m", "compensator.compare.worker", str(spec_path)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                check=False,
            )
    except KeyboardInterrupt:
        raise RunInterrupted(
            f"interrupted in cell {cell.name}; finished cells (and its finished blocks) are kept "
            f"in {out / 'cells'}: run the same command again to continue"
        ) from None
    if done.returncode == 130 or done.returncode < 0:
        raise RunInterrupted(f"cell {cell.name} was stopped; rerun the same command to continue")
    if done.returncode != 0:
        lines = [ln for ln in log_path.read_text().splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error")] or lines[-1:] or ["no output"]
        return {}, f"{errors[-1][:300]} (log: {log_path})"
    spec_path.unlink(missing_ok=True)
    log.debug("cell %s finished in %.1fs", cell.name, time.perf_counter() - t0)
    return json.loads(cell_file(out, cell).read_text()), None
