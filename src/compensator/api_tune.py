"""``compensator.finetune``: the Python face of fine-tuning (the work is in ``tune/``)."""

from __future__ import annotations

from pathlib import Path

import torch

from compensator import __version__
from compensator.tune.run import TuneRun, run_finetune
from compensator.tune.spec import TuneConfig


def finetune(
    checkpoint: str | Path,
    out: str | Path,
    config: TuneConfig | None = None,
    *,
    force: bool = False,
    restart: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> Path:
    """Fine-tune the saved ``checkpoint`` by distillation from its base model (its recorded
    fingerprint checked; ``config.teacher`` overrides) and save the result to ``out`` as a new
    checkpoint. What trains, on what text, how long: :class:`TuneConfig` (docs/finetune.md).
    Integer codes stay fixed, so every export holds the result exactly. Resumable: the state
    is kept in ``<out>.partial`` every ``save_every`` steps and the same call after a kill or
    Ctrl-C continues, bit-identical (``restart`` starts over)."""
    from compensator.api import resolve_device

    run = TuneRun(__version__, force, restart, progress, resolve_device(device))
    return run_finetune(checkpoint, out, config, run)
