"""What a fine-tuning run is asked for: the parts it can train, by name, with their default
learning rates, and :class:`TuneConfig` (no torch here: the command line reads its defaults
and this table for its help)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

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
        Part("scales", 3e-3, True, "group scales (VQ: row scales)"),
        Part("mins", 3e-3, False, "float zero points (--float-min), in steps of the scale"),
        Part("lowrank", 1e-4, False, "float16 low-rank factors (LQER/L2QER/LRC)"),
        Part("codebook", 1e-4, False, "VQ/SSVQ codebooks"),
        Part("norms", 3e-4, False, "RMSNorm/LayerNorm weights"),
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


@dataclass(frozen=True)
class TuneConfig:
    """What ``finetune`` trains, on what, for how long (defaults: docs/finetune.md)."""

    train: str | tuple[str, ...] | None = None  # parts; None: every part the layers hold
    data: str | None = None  # None: the checkpoint's calibration text, other windows
    windows: int = 64
    seqlen: int = 512
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 1
    lr: dict[str, float] = field(default_factory=dict)
    warmup: float = 0.1
    top_k: int = 128
    seed: int = 0
    save_every: int = 20
    teacher: str | None = None

    def check(self) -> None:
        for name in ("windows", "seqlen", "epochs", "batch_size", "top_k", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = name.replace("_", "-")
                raise CompensatorError(f"--{flag} {value!r} is not valid: use a positive integer")
        if self.seqlen < 2:
            raise CompensatorError(f"--seqlen {self.seqlen} is not valid: use >= 2")
        if self.max_steps is not None and self.max_steps < 1:
            raise CompensatorError(f"--max-steps {self.max_steps} is not valid: use >= 1")
        if not 0 <= self.warmup < 1:
            raise CompensatorError(f"--warmup {self.warmup} is not valid: use a share in [0, 1)")
        bad = {k: v for k, v in self.lr.items() if not (v > 0 and v < 1)}
        if bad:
            raise CompensatorError(f"learning rates {bad} are not valid: use values in (0, 1)")
        parse_parts(self.train)
        unknown = set(self.lr) - set(parse_parts(None))
        if unknown:
            raise CompensatorError(f"--lr names unknown parts {sorted(unknown)}")

    def steps(self, n_windows: int) -> int:
        per_epoch = -(-n_windows // self.batch_size)
        total = self.epochs * per_epoch
        return total if self.max_steps is None else min(total, self.max_steps)
