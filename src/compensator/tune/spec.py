"""The parts fine-tuning can train, by name, and their default learning rates (no torch
here: the command line reads this table for its help)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from compensator.errors import CompensatorError


@dataclass(frozen=True)
class Part:
    """A kind of trainable tensor and how it learns: ``relative`` parts train a
    multiplicative change (1 + u) so that one learning rate suits every layer's scale."""

    name: str
    lr: float
    relative: bool
    help: str


PARTS: dict[str, Part] = {
    p.name: p
    for p in (
        Part("scales", 1e-3, True, "group scales (VQ: row scales)"),
        Part("mins", 1e-3, False, "float zero points (--float-min), in steps of the scale"),
        Part("lowrank", 1e-4, False, "float16 low-rank factors (LQER/L2QER/LRC)"),
        Part("codebook", 1e-4, False, "VQ/SSVQ codebooks"),
        Part("norms", 1e-4, False, "RMSNorm/LayerNorm weights"),
    )
}
DEFAULT_PARTS = ("scales", "mins", "lowrank", "codebook", "norms")


def parse_parts(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """``"scales,norms"`` (or a list; None: every part) as known part names, in order."""
    if spec is None:
        return DEFAULT_PARTS
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in PARTS]
    if unknown or not names:
        raise CompensatorError(
            f"--train {','.join(names) or '(empty)'}: unknown part {', '.join(unknown) or ''}; "
            f"use a comma-separated list of {', '.join(PARTS)}"
        )
    return tuple(dict.fromkeys(names))
