"""The Python API: ``quantize``, ``save``, ``load``, ``evaluate``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compensator import __version__
from compensator.data import load_calibration_windows, load_eval_windows, resolve_text
from compensator.errors import CompensatorError
from compensator.evaluate import EvalResult
from compensator.evaluate import evaluate as evaluate_windows
from compensator.io.atomic import check_out, check_out_file
from compensator.io.formats import ExportSource, get_format
from compensator.io.formats import export as export_source
from compensator.io.native import (
    FORMAT_VERSION,
    BlockFiles,
    load_checkpoint,
    read_quantization_config,
    save_checkpoint,
)
from compensator.io.targets import load_target, recorded_base
from compensator.models.adapter import ModelAdapter, get_adapter
from compensator.models.arguments import check_arguments
from compensator.models.checks import (
    check_calibration_size,
    check_no_fused_weights,
    check_reference,
    check_scheme_fits,
    check_seqlen,
    check_token_ids,
)
from compensator.models.fingerprint import (
    source_fingerprint,
    tensors_fingerprint,
)
from compensator.models.lazy import has_meta_tensors
from compensator.models.loading import LoadedModel, load_model
from compensator.nn.layers import bits_per_weight
from compensator.parallel import SOLO, Ranks, current
from compensator.pipeline.passes import StarvedExperts
from compensator.pipeline.report import PipelineReport
from compensator.pipeline.resume import RunState
from compensator.pipeline.session import PipelineRun, open_model
from compensator.pipeline.storage import StreamsAt
from compensator.recipes.recipe import Recipe, load_recipe
from compensator.tasks import check_tasks, parse_tasks, run_tasks, task_manager

log = logging.getLogger(__name__)


@dataclass
class QuantizedModel:
    """A quantized transformers model (block Linears are ``QuantLinear``) and how it was made."""

    model: nn.Module
    tokenizer: Any
    quantization_config: dict[str, Any]
    report: dict[str, Any] = field(default_factory=dict)
    # The run state its blocks were written to; removed once the model is saved.
    state: RunState | None = field(default=None, repr=False)
    blocks: str = ""  # where its decoder blocks are (model.layers)
    ranks: Ranks = SOLO  # the data-parallel run it came from: only the main rank saves


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CompensatorError(
            f"unknown device {device!r}; use cpu, cuda, cuda:N or auto"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CompensatorError(
            f"device {device!r} asked for but CUDA is not available; use --device cpu"
        )
    return dev


def quantize(
    model: str | nn.Module | LoadedModel,
    recipe: str | Path | Recipe = "gptq",
    *,
    tokenizer: Any = None,
    calibration: str | torch.Tensor | None = None,
    calib_windows: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool | None = None,
    float_min: bool | None = None,
    kquant: str | None = None,
    rank: int | str | None = None,
    act_bits: int | None = None,
    epochs: int | None = None,
    device: str | torch.device | None = "auto",
    batch_size: int = 8,
    inplace: bool = False,
    progress: bool = True,
    resume: str | Path | RunState | None = None,
    restart: bool = False,
    trust_remote_code: bool = False,
    starved_experts: StarvedExperts = "all-tokens",
    lazy: bool | None = None,
    streams: StreamsAt = "auto",
    offload_dir: str | Path | None = None,
    ranks: Ranks | None = None,
    dtype: str | torch.dtype | None = None,
) -> QuantizedModel:
    """Quantize the Linear layers of the decoder blocks of ``model`` with ``recipe``.

    ``model`` is a built-in name, a path (HF directory or .gguf) or a loaded model (then
    ``tokenizer`` is required; it is copied first unless ``inplace``). ``calibration`` is a
    data source as in :func:`compensator.data.resolve_text` (default: WikiText-2 validation
    when COMPENSATOR_DATA is set, else the embedded corpus), or a LongTensor of token
    windows [n, seqlen] used as is. ``rank`` is a number of components or a share like "30%";
    ``kquant`` ("Q4_K", ...) and ``float_min`` fit GGUF's own grids (docs/export.md). No
    process-wide state: every random draw has its own generator, from ``seed``.

    ``resume`` (a directory, or an open :class:`RunState`) keeps every finished block there:
    the same call after a crash or Ctrl-C continues at the first unfinished block,
    bit-identical; other arguments, or ``restart``, start over; :func:`save` removes it.
    ``trust_remote_code``: let the model run its own code. ``starved_experts``: an MoE expert
    routed too few tokens is calibrated on "all-tokens" or rounded "rtn". ``lazy`` (default: with a ``resume`` state and a safetensors dir or GGUF) reads
    each block only while it is quantized; the result can then only be saved. ``streams``:
    where calibration activations rest ("device", "cpu", "disk": memory-mapped under
    ``offload_dir``, default the ``resume`` dir; "auto" picks from free memory). ``dtype``:
    what the blocks run and the streams rest in ("float32", "bfloat16", "float16", "auto": the
    config's; default float32 for files, an object's own); statistics and rounding stay
    float32. All: docs/big-models.md. Under torchrun (``ranks``: by default the
    torch.distributed group this process is in) the run is data-parallel: docs/distributed.md."""
    check_arguments(locals())  # types and ranges (group size too), before any reading
    rec = load_recipe(recipe).with_overrides(
        bits=bits, group_size=group_size, symmetric=symmetric, epochs=epochs, kquant=kquant,
        float_min=float_min, rank=rank, act_bits=act_bits, seed=seed,
    )  # fmt: skip
    if rec.needs_data() and not isinstance(calibration, torch.Tensor):
        check_calibration_size(calib_windows, seqlen)
    dev, ranks = resolve_device(device), ranks or current()
    with ExitStack() as stack:
        state = _run_state(stack, resume, restart, ranks)
        in_memory = not isinstance(model, str | Path)
        loaded, net, experts = open_model(
            model, tokenizer, rec, trust_remote_code, lazy, inplace, state is not None, dtype
        )
        adapter = _checked_adapter(net, rec, rank, group_size)
        ids, calib_info = _calibration(loaded, net, rec, calibration, calib_windows, seqlen, seed)
        starved = starved_experts if experts else None
        run = PipelineRun(
            rec, dev, batch_size, progress, state, __version__, starved, loaded.weights,
            streams, offload_dir, ranks,
        )  # fmt: skip
        base_fp = _base_fingerprint(loaded, net, in_memory)
        report = run.pipeline(net.eval(), adapter, loaded.source, base_fp, ids, calib_info)
    qconfig = _quantization_config(net, rec, report, loaded.source, calib_info, base_fp, starved)
    return QuantizedModel(
        net, loaded.tokenizer, qconfig, report.to_dict(), run.state, adapter.arch.blocks, ranks
    )


def _checked_adapter(
    net: nn.Module, rec: Recipe, rank: int | str | None, group_size: int | None
) -> ModelAdapter:
    """The model's adapter, after the checks that need only its shapes; warns where a
    K-quant spec falls back to another type (rows that are not whole super-blocks)."""
    adapter = get_adapter(net)
    check_no_fused_weights(adapter.blocks(net), adapter.arch.blocks)
    check_scheme_fits(net, adapter, rank, group_size)
    prefix = f"{adapter.arch.blocks}."
    widths = [m.in_features for n, m in net.named_modules()
              if isinstance(m, nn.Linear) and n.startswith(prefix)]  # fmt: skip
    note = rec.scheme.weights.fallback_note(widths)
    if note:
        log.warning(note)
    return adapter


def _run_state(
    stack: ExitStack, resume: str | Path | RunState | None, restart: bool, ranks: Ranks
) -> RunState | None:
    """The run state to keep finished blocks in: locked by the main rank, read by others."""
    if resume is None or isinstance(resume, RunState):
        return resume
    if not ranks.main:
        return RunState.follow(resume)
    return stack.enter_context(RunState.open(resume, restart=restart))


def _base_fingerprint(loaded: LoadedModel, net: nn.Module, in_memory: bool) -> dict[str, Any]:
    return (None if in_memory else source_fingerprint(loaded.source)) or tensors_fingerprint(net)


def _calibration(
    loaded: LoadedModel,
    net: nn.Module,
    rec: Recipe,
    calibration: str | torch.Tensor | None,
    windows: int,
    seqlen: int,
    seed: int,
) -> tuple[torch.Tensor | None, dict[str, Any] | None]:
    """The calibration token windows, and how they were made (for the checkpoint); none
    for a recipe that reads no data (a named file must exist all the same)."""
    if not rec.needs_data():
        if isinstance(calibration, str) and not calibration.startswith("hf:"):
            resolve_text(calibration, "calib")
            log.info("recipe %s uses no calibration data; %s is not read", rec.name, calibration)
        return None, None
    if not isinstance(calibration, torch.Tensor):
        check_seqlen(seqlen, net)
    ids, info = _windows(loaded, calibration, windows, seqlen, seed)
    check_token_ids(ids, net, "calibration data")
    return ids, info


def _windows(
    loaded: LoadedModel,
    calibration: str | torch.Tensor | None,
    windows: int,
    seqlen: int,
    seed: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    if isinstance(calibration, torch.Tensor):
        ids = calibration.long()
        return ids, {"source": "token ids", "windows": ids.shape[0], "seqlen": ids.shape[1]}
    ids = load_calibration_windows(loaded.tokenizer, calibration, windows, seqlen, seed)
    info = {"source": calibration or "default", "windows": windows, "seqlen": seqlen, "seed": seed}
    return ids, info


def _quantization_config(
    net: nn.Module,
    rec: Recipe,
    report: PipelineReport,
    base_model: str,
    calibration: dict[str, Any] | None,
    base_fingerprint: Any,
    starved: StarvedExperts | None,
) -> dict[str, Any]:
    acts, modules = rec.scheme.activations, report.quantized_layers
    experts = {} if starved is None else {"experts": {"layout": "unfused", "starved": starved}}
    return {
        "quant_method": "compensator",
        "format_version": FORMAT_VERSION,
        "compensator_version": __version__,
        "scheme": rec.label(),
        "weights": rec.scheme.weights.model_dump() if rec.rounder.uses_weight_scheme else None,
        "activations": None if acts is None else acts.model_dump(),
        "bits_per_weight": bits_per_weight(net),
        "packing": "int32, little-endian bit stream along the input dimension",
        "modules": modules,
        "layers": {name: net.get_submodule(name).record() for name in modules},
        "base_model": base_model,
        "recipe": rec.to_yaml_dict(),
        "calibration": calibration,
        "base_model_fingerprint": base_fingerprint,
        **experts,
    }


def save(
    qmodel: QuantizedModel,
    out: str | Path,
    *,
    format: str = "native",
    force: bool = False,
    **options: Any,
) -> Path:
    """Write ``qmodel`` to ``out`` as a native checkpoint, or in another registered format
    (``compressed-tensors``, ``gguf``; see compensator.io) with that format's ``options``.
    In a data-parallel run only the main rank writes; the others return ``out`` at once."""
    check_arguments(locals())
    if not qmodel.ranks.main:
        return Path(out)
    on_disk = has_meta_tensors(qmodel.model)
    if on_disk and (qmodel.state is None or format != "native" or options):
        raise CompensatorError(
            "this model was quantized block by block and its blocks are in its run state: "
            "save it once in the native format, then export the saved checkpoint"
        )
    if on_disk:  # the state is no longer locked: check it still holds this run's blocks
        qmodel.state.check_blocks(qmodel.report["blocks"])
    if format == "native" and not options:
        path = save_checkpoint(
            qmodel.model, qmodel.quantization_config, out, tokenizer=qmodel.tokenizer,
            force=force,
            blocks=BlockFiles(qmodel.blocks, qmodel.state.block_file) if on_disk else None,
        )  # fmt: skip
    else:
        source = ExportSource(qmodel.model, qmodel.quantization_config, qmodel.tokenizer)
        path = export_source(source, out, get_format(format, **options), force=force)
    if qmodel.state is not None:
        qmodel.state.discard()
        qmodel.state = None
    return path


def export(
    checkpoint: str | Path, out: str | Path, *, format: str, force: bool = False, **options: Any
) -> Path:
    """Convert a saved checkpoint to another format (see :func:`save`)."""
    check_arguments(locals())
    fmt = get_format(format, **options)  # bad options fail before loading anything
    (check_out_file if fmt.path_is_file else check_out)(out, force, (checkpoint,))
    model, tokenizer, _ = load_target(checkpoint, require_checkpoint=True)
    config = read_quantization_config(checkpoint)["quantization_config"]
    source = ExportSource(model, config, tokenizer)
    return export_source(source, out, fmt, force=force, protect=(checkpoint,))


def load(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    check_arguments(locals())
    return load_checkpoint(path, device=device)


def evaluate(
    target: str | Path | nn.Module | QuantizedModel,
    *,
    fp: str | Path | nn.Module | None = None,
    tokenizer: Any = None,
    data: str | None = None,
    windows: int | None = None,
    seqlen: int = 512,
    batch_size: int = 1,
    progress: bool = True,
    trust_remote_code: bool = False,
    tasks: str | Sequence[str] | None = None,
    include_path: str | Path | None = None,
    limit: int | None = None,
) -> EvalResult:
    """Perplexity (and KL against ``fp`` when given) with the DESIGN protocol.

    For a checkpoint path the FP reference defaults to the base model it records (refused
    unless its files are the recorded ones). ``trust_remote_code`` lets a plain model (the
    target or ``fp``) run the Python code it ships; checkpoints never do. ``tasks`` (names or
    "a,b") adds lm-eval's metrics per task (``include_path``: local task YAMLs; ``limit``:
    documents per task): :mod:`compensator.tasks`.
    """
    check_arguments(locals())
    if windows is not None and windows < 1:
        raise CompensatorError(f"--windows {windows} is not valid: use a positive count")
    if seqlen < 2:
        raise CompensatorError(f"--seqlen {seqlen} is not valid: use >= 2")
    task_names = parse_tasks(tasks)
    manager = task_manager(include_path, task_names) if task_names else None
    if manager is not None:
        check_tasks(task_names, manager, limit)  # before anything is loaded
    qc: dict[str, Any] | None = None
    if isinstance(target, QuantizedModel) and has_meta_tensors(target.model):
        raise CompensatorError(
            "this model was quantized block by block and lives in its run state: save it "
            "(compensator.save) and evaluate the saved checkpoint"
        )
    if isinstance(target, QuantizedModel):
        model, tokenizer, qc = (
            target.model,
            tokenizer or target.tokenizer,
            target.quantization_config,
        )
    elif isinstance(target, str | Path):
        model, tok, qc = load_target(target, trust_remote_code=trust_remote_code)
        tokenizer = tokenizer or tok
    else:
        model = target
    if tokenizer is None:
        raise CompensatorError("evaluate(model_object) needs tokenizer=...")
    fp_model = fp if isinstance(fp, nn.Module) else None
    if fp is not None and fp_model is None:
        fp_model = load_model(str(fp), trust_remote_code=trust_remote_code).model
    elif fp is None and qc is not None and qc.get("base_model"):
        fp_model = recorded_base(qc["base_model"], qc.get("base_model_fingerprint"))
    if fp_model is not None:
        check_reference(model, fp_model, fp if fp is not None else (qc or {}).get("base_model"))
    check_seqlen(seqlen, model)
    ids = load_eval_windows(tokenizer, data, seqlen, windows)
    check_token_ids(ids, model, "evaluation text")
    result = evaluate_windows(
        model, ids, fp_model=fp_model, batch_size=batch_size, progress=progress
    )
    result.bits_per_weight = bits_per_weight(model)
    if task_names:
        result.tasks = run_tasks(
            model, tokenizer, task_names, limit=limit, batch_size=batch_size, manager=manager
        )
    return result
