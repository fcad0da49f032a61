"""``compensator compare``: the command line of :mod:`compensator.compare`."""

from __future__ import annotations

import shlex
from typing import Any

import click

from compensator.cli_options import friendly, no_progress_bars
from compensator.errors import CompensatorError


def _command_line(ctx: click.Context) -> str:
    """The command as typed, up to option order: the arguments and every non-default option."""
    words = ["compensator", ctx.info_name or "compare"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if value in (None, False, ()) or value == param.default or param.name == "no_progress":
            continue
        if isinstance(param, click.Argument):
            words.append(str(value))
            continue
        flag = max(param.opts, key=len)
        values = value if isinstance(value, tuple) else (value,)
        words += [flag] if value is True else [w for v in values for w in (flag, str(v))]
    return shlex.join(words)


def _ints(text: str | None, what: str) -> list[int]:
    try:
        return [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise CompensatorError(f"--{what} {text!r}: give comma-separated integers") from None


@click.command("compare")
@click.argument("model")
@click.option("--recipes", required=True, help="Comma-separated presets or YAML files.")
@click.option(
    "--bits", "bits_list", default=None, help="Weight bits, e.g. 2,3,4 (default: each recipe's)."
)
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds, e.g. 0,1,2.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Report directory.")
@click.option(
    "--group-size", type=int, default=None, help="Columns per group (default: the recipe's)."
)
@click.option("--calib", default=None, help="Calibration text (as for quantize).")
@click.option("--calib-windows", type=int, default=32, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--data", "eval_data", default=None, help="Eval text (as for eval).")
@click.option("--windows", "eval_windows", type=int, default=8, show_default=True)
@click.option("--tasks", default=None, help="lm-eval tasks, comma-separated.")
@click.option("--include-path", default=None, help="Folder of local lm-eval task YAML files.")
@click.option("--limit", type=int, default=None, help="Documents per task.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--peers", multiple=True, help="Peer results JSON (benchmarks/peers/); repeatable.")
@click.option("--metric", type=click.Choice(["ppl", "kl"]), default="ppl", show_default=True)
@click.option("--keep-checkpoints", is_flag=True, help="Keep every cell's checkpoint.")
@click.option("--no-progress", is_flag=True)
@friendly
def compare_cmd(model: str, recipes: str, bits_list: str | None, seeds: str, out: str,
                peers: tuple[str, ...], metric: str, keep_checkpoints: bool, no_progress: bool,
                tasks: str | None, **settings: Any) -> None:  # fmt: skip
    """Quantize MODEL with every recipe x bits x seed and write report.md, report.json and
    frontier.png to --out; a rerun reuses every finished cell (docs/compare.md)."""
    import torch

    from compensator.compare import Settings, compare
    from compensator.tasks import parse_tasks

    if no_progress:
        no_progress_bars()
    bits: list[int | None] = list(_ints(bits_list, "bits")) or [None]
    if any(b is not None and not 2 <= b <= 8 for b in bits):
        raise CompensatorError(f"--bits {bits_list}: every value must be within 2..8")
    report = compare(
        Settings(model=model, tasks=parse_tasks(tasks), **settings),
        [r.strip() for r in recipes.split(",") if r.strip()], bits, _ints(seeds, "seeds"), out,
        threads=torch.get_num_threads(), peers=list(peers), measure=metric,
        keep_checkpoints=keep_checkpoints, progress=not no_progress,
        command=_command_line(click.get_current_context()),
    )  # fmt: skip
    click.echo(f"wrote {out}/report.md, report.json, frontier.png ({len(report['cells'])} cells)")
