"""The grid of a comparison: which cells exist, what makes a finished cell reusable, and the
files a cell leaves in ``<out>/cells``."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compensator.errors import CompensatorError


@dataclass(frozen=True)
class Cell:
    """One quantize-and-evaluate run: a recipe at some bits (None: the recipe's own) and a
    calibration seed; ``recipe is None`` is the FP model's row."""

    recipe: str | None
    bits: int | None = None
    seed: int = 0

    @property
    def name(self) -> str:
        if self.recipe is None:
            return "fp"
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(self.recipe).stem)
        return f"{slug}-w{self.bits if self.bits is not None else 'default'}-s{self.seed}"


@dataclass
class Settings:
    """What every cell of one comparison shares (the protocol)."""

    model: str
    group_size: int | None = None
    calib: str | None = None
    calib_windows: int = 32
    seqlen: int = 512
    eval_data: str | None = None
    eval_windows: int | None = 8
    tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    limit: int | None = None
    batch_size: int = 8
    device: str = "auto"

    def key(self, cell: Cell) -> dict[str, Any]:
        """Everything a cell's numbers depend on: a finished cell is reused only when equal."""
        return {**asdict(self), **asdict(cell)}


def grid(
    recipes: list[str], bits: list[int | None], seeds: list[int], seeded: dict[str, bool]
) -> list[Cell]:
    """Every recipe x bits x seed; a recipe that draws nothing at random (``seeded`` False:
    no calibration data, no seeded step) runs once per bits, at the first seed."""
    if not recipes:
        raise CompensatorError("--recipes is empty: name at least one recipe (e.g. rtn,gptq)")
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompensatorError(f"--seeds {seeds} must be distinct integers, at least one")
    cells = []
    for recipe in recipes:
        for b in bits:
            for seed in seeds if seeded[recipe] else seeds[:1]:
                cells.append(Cell(recipe, b, seed))
    return cells


def cell_file(out: Path, cell: Cell) -> Path:
    return out / "cells" / f"{cell.name}.json"


def finished(out: Path, cell: Cell, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cell's recorded row if it finished with these settings, else None."""
    path = cell_file(out, cell)
    try:
        row = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return row if row.get("key") == key else None


def write_text(path: Path, text: str) -> None:
    """Write whole or not at all: a crash never leaves a truncated file that looks finished."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")
