"""``compensator finetune``: distil a checkpoint's base model into its scales, norms,
low-rank factors or codebooks (docs/finetune.md)."""

from __future__ import annotations

from typing import Any

import click

from compensator.cli_options import friendly, no_progress_bars
from compensator.errors import CompensatorError
from compensator.tune.spec import PARTS, TuneConfig


def _lr_pairs(values: tuple[str, ...]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in values:
        part, sep, rate = item.partition("=")
        try:
            out[part.strip()] = float(rate)
        except ValueError:
            sep = ""
        if not sep:
            raise CompensatorError(f"--lr {item!r} is not PART=RATE (e.g. --lr scales=2e-3)")
    return out


_PARTS_HELP = (
    "Parts to train, comma-separated: "
    + "; ".join(f"{p.name} ({p.help})" for p in PARTS.values())
    + ". Default: every part the checkpoint holds."
)


@click.command("finetune")
@click.argument("checkpoint")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="New checkpoint.")
@click.option("--train", "train", default=None, help=_PARTS_HELP)
@click.option(
    "--data", default=None, help="Own text (file, hf:...); default: the calibration text."
)
@click.option("--teacher", default=None, help="Distil from this model (default: the base model).")
@click.option(
    "--windows", type=int, default=TuneConfig.windows, show_default=True, help="Training windows."
)
@click.option("--seqlen", type=int, default=TuneConfig.seqlen, show_default=True)
@click.option("--epochs", type=int, default=TuneConfig.epochs, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Stop after N optimizer steps.")
@click.option(
    "--batch-size",
    type=int,
    default=TuneConfig.batch_size,
    show_default=True,
    help="Windows per step.",
)
@click.option("--lr", "lr", multiple=True, help="PART=RATE, overrides a part's learning rate.")
@click.option(
    "--warmup", type=float, default=TuneConfig.warmup, show_default=True, help="Share of steps."
)
@click.option(
    "--top-k", type=int, default=TuneConfig.top_k, show_default=True, help="Teacher tokens cached."
)
@click.option("--seed", type=int, default=TuneConfig.seed, show_default=True)
@click.option(
    "--save-every",
    type=int,
    default=TuneConfig.save_every,
    show_default=True,
    help="Steps per state save.",
)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--force", is_flag=True, help="Replace an earlier output of ours at --out.")
@click.option("--restart", is_flag=True, help="Discard the state kept in <out>.partial.")
@click.option("--no-progress", is_flag=True)
@friendly
def finetune_cmd(
    checkpoint: str,
    out: str,
    lr: tuple[str, ...],
    device: str,
    force: bool,
    restart: bool,
    no_progress: bool,
    **opts: Any,
) -> None:
    """Fine-tune CHECKPOINT by distillation from its base model and save it to --out.

    Integer codes stay fixed: the result exports exactly like its source. The state is kept
    in <out>.partial every --save-every steps: after a kill or Ctrl-C the same command
    resumes, bit-identical to an uninterrupted run."""
    from compensator.api_tune import finetune

    if no_progress:
        no_progress_bars()
    config = TuneConfig(lr=_lr_pairs(lr), **opts)
    path = finetune(
        checkpoint, out, config, force=force, restart=restart, progress=not no_progress,
        device=device,
    )  # fmt: skip
    click.echo(f"saved {path}")
