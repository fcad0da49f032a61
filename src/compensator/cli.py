"""Command line: ``compensator quantize | eval | recipes | demo``.

User errors print one line (``error: ...``) and exit with status 2; Ctrl-C exits with 130
and leaves no half-written checkpoint (saving writes to a temporary directory first).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import click

from compensator import __version__
from compensator.cli_compare import compare_cmd
from compensator.cli_finetune import finetune_cmd
from compensator.cli_options import (
    KQUANT_CHOICES,
    friendly,
    interrupt_on_sigterm,
    no_progress_bars,
    scheme_options,
    setup_logging,
)
from compensator.errors import CompensatorError, RunInterrupted
from compensator.models.dtypes import DTYPE_CHOICES
from compensator.parallel import launched
from compensator.pipeline.memory import fix_mmap_threshold, peak_rss_mb

log = logging.getLogger("compensator")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging.")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("--threads", type=click.IntRange(min=1), help="torch CPU threads (default: torch's).")
@click.version_option(__version__, package_name="compensator")  # works uninstalled too
def main(verbose: int, quiet: bool, threads: int | None) -> None:
    """Post-training quantization of LLMs that compensates quantization error."""
    follower = launched() and os.environ.get("RANK", "0") != "0"
    setup_logging(verbose, quiet or follower)  # under torchrun the main rank speaks
    if follower:
        no_progress_bars()
    fix_mmap_threshold()  # freed tensors go back to the system: docs/big-models.md
    interrupt_on_sigterm(click.get_current_context())
    if threads:
        import torch

        torch.set_num_threads(threads)


_STARVED = click.Choice(["all-tokens", "rtn"])
_STARVED_HELP = "MoE: an expert routed too few tokens is calibrated on all tokens, or RTN."
_STREAMS_HELP = "Where calibration activations rest (auto: from free memory; disk: mmap files)."
_OFFLOAD_HELP = "Directory for --streams disk (default: <out>.partial)."


@main.command()
@click.argument("model")
@click.option(
    "--recipe", "recipe", default="gptq", show_default=True, help="Preset name or YAML file."
)
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Checkpoint directory."
)
@scheme_options
@click.option(
    "--calib",
    "calib",
    default=None,
    help="Calibration text: file, wikitext2-valid, embedded, hf:...",
)
@click.option("--calib-windows", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--force", is_flag=True, help="Replace a non-empty --out.")
@click.option("--trust-remote-code", is_flag=True, help="Let MODEL run the code it ships.")
@click.option("--restart", is_flag=True, help="Discard the blocks kept in <out>.partial.")
@click.option("--starved-experts", type=_STARVED, default="all-tokens", help=_STARVED_HELP)
@click.option(
    "--streams",
    type=click.Choice(["auto", "device", "cpu", "disk"]),
    default="auto",
    help=_STREAMS_HELP,
)
@click.option("--offload-dir", type=click.Path(file_okay=False), help=_OFFLOAD_HELP)
@click.option(
    "--dtype",
    type=click.Choice(DTYPE_CHOICES),
    default=None,
    help="Load and calibrate in (default float32; auto: the config's). Maths stays float32.",
)
@click.option("--no-progress", is_flag=True)
@friendly
def quantize(
    model: str, recipe: str, out: str, force: bool, restart: bool, no_progress: bool, **opts: Any
) -> None:
    """Quantize MODEL (built-in name, HF directory, .gguf file or hub id) and save it to --out.

    Finished blocks are kept in <out>.partial until the checkpoint is saved: after a crash,
    kill or Ctrl-C the same command resumes where the run stopped.

    Under torchrun (torchrun --nproc-per-node N -m compensator quantize ...) the run is
    data-parallel over the N processes and rank 0 writes the checkpoint: docs/distributed.md."""
    from compensator.api import resolve_device
    from compensator.io.atomic import check_out, state_dir
    from compensator.parallel import process_group, rank_device
    from compensator.pipeline.resume import RunState

    check_out(out, force, protect=(model,))  # fail before the expensive part
    if no_progress:
        no_progress_bars()
    opts["device"] = rank_device(resolve_device(opts["device"]))
    with process_group(opts["device"]) as ranks:
        if not ranks.main:  # the main rank locks and writes the state; the others read it
            state = RunState.follow(state_dir(out))
            _quantize_and_save(model, recipe, out, force, state, False, opts)
            return
        with RunState.open(state_dir(out), restart=restart) as state:
            try:
                _quantize_and_save(model, recipe, out, force, state, not no_progress, opts)
            except RunInterrupted:
                raise
            except KeyboardInterrupt:  # while saving: every block is kept
                raise RunInterrupted(state.interrupted_message()) from None


def _quantize_and_save(
    model: str,
    recipe: str,
    out: str,
    force: bool,
    state: Any,
    progress: bool,
    opts: dict[str, Any],
) -> None:
    from compensator import api

    t0 = time.perf_counter()
    calibration = opts.pop("calib")
    qm = api.quantize(
        model, recipe, calibration=calibration, progress=progress, resume=state, **opts
    )
    path = api.save(qm, out, force=force)
    if not qm.ranks.main:
        return
    layers, seconds = len(qm.quantization_config["modules"]), time.perf_counter() - t0
    click.echo(
        f"saved {path} ({layers} quantized layers, {seconds:.1f}s, peak RSS {peak_rss_mb():.0f} MB)"
    )


@main.command("eval")
@click.argument("target")
@click.option("--fp", default=None, help="FP reference model (default: a checkpoint's base model).")
@click.option("--data", default=None, help="Eval text: wikitext2, embedded, a file, hf:...")
@click.option("--windows", type=int, default=None, help="Only the first N windows (default: all).")
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--trust-remote-code", is_flag=True, help="Let a plain model run the Python code it ships."
)
@click.option("--tasks", default=None, help="lm-eval tasks, comma-separated (arc_easy,hellaswag).")
@click.option("--include-path", default=None, help="Folder of local lm-eval task YAML files.")
@click.option("--limit", type=int, default=None, help="Only the first N documents of each task.")
@click.option("--no-progress", is_flag=True)
@friendly
def eval_cmd(target: str, as_json: bool, no_progress: bool, **opts: Any) -> None:
    """Perplexity of TARGET (a checkpoint or a model) and KL divergence from the FP model;
    with --tasks, lm-evaluation-harness's metrics of each task too."""
    from compensator import api

    if no_progress:
        no_progress_bars()
    result = api.evaluate(target, progress=not no_progress, **opts)
    if as_json:
        click.echo(json.dumps(result.to_dict(), allow_nan=False))
        return
    fp_ppl = "-" if result.fp_ppl is None else f"{result.fp_ppl:.3f}"
    kl = "-" if result.kl is None else f"{result.kl:.4f}"
    bpw = "" if result.bits_per_weight is None else f"  bits/weight {result.bits_per_weight:.2f}"
    click.echo(
        f"ppl {result.ppl:.3f}  fp_ppl {fp_ppl}  kl {kl}{bpw}  "
        f"({result.windows} windows x {result.seqlen})"
    )
    for task, metrics in (result.tasks or {}).items():
        shown = "  ".join(
            f"{k} {'-' if v is None else f'{v:.4f}'}"
            for k, v in metrics.items()
            if "stderr" not in k
        )
        click.echo(f"{task}: {shown}")


_EXPORT_OPTION_OF = {
    "--no-regroup": "compressed-tensors",
    "--dtype": "compressed-tensors",
    "--gguf-type": "gguf",
    "--gguf-base": "gguf",
}


@main.command("export")
@click.argument("checkpoint")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["compressed-tensors", "gguf", "native"]),
    required=True,
    help="compressed-tensors (transformers, vLLM) or gguf (llama.cpp, ollama).",
)
@click.option("--out", required=True, help="Output directory (a .gguf file for gguf).")
@click.option(
    "--no-regroup",
    is_flag=True,
    help="compressed-tensors: refuse a ragged last group instead of re-grouping it exactly.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16"]),
    default=None,
    help="compressed-tensors: dtype of scales and unquantized tensors (default float32).",
)
@click.option(
    "--gguf-type",
    type=click.Choice(["auto", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", *KQUANT_CHOICES]),
    default=None,
    help="gguf: block type (default: from the scheme).",
)
@click.option("--gguf-base", default=None, help="gguf: a GGUF of the base model (tokenizer).")
@click.option("--force", is_flag=True, help="Replace an existing --out.")
@friendly
def export_cmd(
    checkpoint: str,
    fmt: str,
    out: str,
    no_regroup: bool,
    dtype: str | None,
    gguf_type: str | None,
    gguf_base: str | None,
    force: bool,
) -> None:
    """Convert CHECKPOINT (written by quantize) to a format other engines load."""
    from compensator import api

    options: dict[str, Any] = {}
    if fmt == "compressed-tensors":
        options = {"regroup": not no_regroup, **({"dtype": dtype} if dtype else {})}
    elif fmt == "gguf":
        options = {"gguf_type": gguf_type or "auto", "base": gguf_base}
    given = {"--no-regroup": no_regroup, "--dtype": dtype, "--gguf-type": gguf_type,
             "--gguf-base": gguf_base}  # fmt: skip
    stray = [flag for flag, value in given.items() if value and _EXPORT_OPTION_OF[flag] != fmt]
    if stray:
        raise CompensatorError(f"{', '.join(stray)} mean nothing for --format {fmt}")
    t0 = time.perf_counter()
    path = api.export(checkpoint, out, format=fmt, force=force, **options)
    click.echo(f"exported {path} ({fmt}, {time.perf_counter() - t0:.1f}s)")


@main.command()
@friendly
def recipes() -> None:
    """List the preset recipes."""
    from compensator.recipes.recipe import load_recipe, preset_names

    for name in preset_names():
        r = load_recipe(name)
        steps = " -> ".join(_step_label(s) for s in r.steps)
        click.echo(f"{name:22s} {r.label():18s} {steps}")
        if r.description:
            click.echo(f"{'':22s} {r.description}")


def _step_label(step: Any) -> str:
    options = step.model_dump(exclude_defaults=True)
    inner = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{step.name}({inner})" if inner else step.name


@main.command("plan")
@click.argument("model")
@click.option("--recipe", default="gptq", show_default=True, help="Preset name or YAML file.")
@scheme_options
@click.option("--calib-windows", type=int, default=128, show_default=True)
@click.option("--seqlen", type=int, default=512, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True)
@click.option("--whole", is_flag=True, help="Plan a whole load (hub models, quarot-*).")
@click.option("--ranks", type=click.IntRange(1), default=1, help="Data-parallel ranks (torchrun).")
@click.option(
    "--dtype", type=click.Choice(DTYPE_CHOICES), default="float32", show_default=True,
    help="As quantize --dtype.",
)  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@friendly
def plan_cmd(model: str, recipe: str, whole: bool, as_json: bool, **opts: Any) -> None:
    """Peak memory, disk and rough time of quantizing MODEL, from its config alone."""
    from compensator.plan import format_plan, plan
    from compensator.recipes.recipe import load_recipe

    keys = ("bits", "group_size", "symmetric", "float_min", "kquant", "rank", "act_bits", "epochs")
    rec = load_recipe(recipe).with_overrides(**{k: opts[k] for k in keys})
    p = plan(
        model, rec, opts["calib_windows"], opts["seqlen"], opts["batch_size"], whole,
        opts["ranks"], opts["dtype"],
    )  # fmt: skip
    click.echo(json.dumps(p) if as_json else format_plan(p))


@main.command()
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option(
    "--recipes",
    "recipe_names",
    default="rtn,gptq",
    show_default=True,
    help="Comma-separated presets.",
)
@scheme_options
@click.option("--calib-windows", type=int, default=32, show_default=True)
@click.option(
    "--windows", type=int, default=16, show_default=True, help="Eval windows of 512 tokens."
)
@click.option("--no-progress", is_flag=True)
@friendly
def demo(
    model: str,
    recipe_names: str,
    windows: int,
    calib_windows: int,
    no_progress: bool,
    **scheme: Any,
) -> None:
    """Quantize the bundled model with each recipe and print a quality table."""
    from compensator.demo import format_table, run_demo

    rows = run_demo(
        model,
        [r.strip() for r in recipe_names.split(",") if r.strip()],
        **scheme,
        eval_windows=windows,
        calib_windows=calib_windows,
        progress=not no_progress,
    )
    click.echo(format_table(rows))


main.add_command(compare_cmd)
main.add_command(finetune_cmd)

if __name__ == "__main__":
    main()
