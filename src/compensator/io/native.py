"""Quantized checkpoints: packed weights in safetensors, ``quantization_config`` in config.json.

Layout of a checkpoint directory::

    config.json          the model config + quantization_config (method, scheme, base model, and
                         per quantized layer a record of what it holds: format, spec, rank, ...)
    model.safetensors    every tensor of the model; quantized Linears as qweight/scales/qzeros
    tokenizer files      when a tokenizer was given
    recipe.yaml          the recipe that produced it

Writing goes to a hidden temporary sibling directory that is renamed into place only when
complete, so an interrupted save never leaves a directory that looks like a checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import torch
import transformers
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

from compensator.errors import CompensatorError
from compensator.io.atomic import atomic_dir, dir_size
from compensator.io.formats import ExportSource, Format, register_format
from compensator.io.manifest import MANIFEST, write_manifest
from compensator.io.streamed import TensorRef, in_memory, write_streamed
from compensator.models.fingerprint import file_sha256
from compensator.nn.experts import unfuse_experts
from compensator.nn.layers import layer_from_record, replace_module

log = logging.getLogger(__name__)

QUANT_METHOD = "compensator"
# 3: a record per layer ("layers"); 2: lowrank_input "split"; 1: one spec for the model.
FORMAT_VERSION = 3


WEIGHTS_FILE = "model.safetensors"


def is_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        qc = json.loads(config.read_text()).get("quantization_config") or {}
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def save_checkpoint(
    model: nn.Module,
    quantization_config: dict[str, Any],
    out: str | Path,
    *,
    tokenizer: Any = None,
    force: bool = False,
    blocks: BlockFiles | None = None,
) -> Path:
    """Write a native checkpoint. With ``blocks`` (where each block's tensors are; the
    model's blocks are then on the meta device) it is assembled from those files one tensor
    at a time, byte-identical to a save from memory."""
    t0 = time.perf_counter()
    base = quantization_config.get("base_model")
    with atomic_dir(out, force=force, protect=(base,) if base else ()) as tmp:
        write_checkpoint(model, quantization_config, tmp, tokenizer=tokenizer, blocks=blocks)
    out = Path(out).resolve()
    log.info(
        "saved checkpoint to %s (%.1f MB) in %.1fs",
        out,
        dir_size(out) / 1e6,
        time.perf_counter() - t0,
    )
    return out


def write_checkpoint(
    model: nn.Module,
    quantization_config: dict[str, Any],
    tmp: Path,
    *,
    tokenizer: Any = None,
    blocks: BlockFiles | None = None,
) -> None:
    """Write the checkpoint's files into the (temporary) directory ``tmp``."""
    config = model.config.to_dict()
    config["quantization_config"] = {
        **quantization_config,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
    # One key: safetensors writes metadata in hash-map order, so with two the same model
    # would give different bytes from run to run (and different manifest hashes).
    metadata = {"format": "pt"}
    if blocks is None:
        save_file(unique_state_dict(model), str(tmp / WEIGHTS_FILE), metadata=metadata)
    else:
        write_streamed(tmp / WEIGHTS_FILE, _refs_from_blocks(model, blocks), metadata)
    recipe = quantization_config.get("recipe")
    if recipe is not None:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(tmp))
    write_manifest(tmp)


@dataclass(frozen=True)
class BlockFiles:
    """Where a quantized model's blocks are: ``path(i)`` holds the tensors of the block at
    ``<blocks>.<i>`` (its state dict)."""

    blocks: str
    path: Callable[[int], Path]


def _refs_from_blocks(model: nn.Module, files: BlockFiles) -> dict[str, TensorRef]:
    """The state dict, tensors of the blocks (on the meta device) read from their files."""
    prefix = files.blocks + "."
    refs: dict[str, TensorRef] = {}
    for name, t in unique_state_dict(model).items():
        if not t.is_meta:
            refs[name] = in_memory(t)
            continue
        index, _, local = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not index.isdigit():
            raise CompensatorError(f"{name} was never read in; the quantized model is incomplete")
        refs[name] = TensorRef(
            t.dtype, tuple(t.shape), partial(_read, files.path(int(index)), local)
        )
    return refs


def _read(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied tensors stored once, under the input embedding's name."""
    state = model.state_dict()
    emb = model.get_input_embeddings()
    emb_name = next((n for n, m in model.named_modules() if m is emb), None)
    first = [f"{emb_name}.weight"] if emb_name is not None else []
    seen: set[tuple[int, tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for name in first + [k for k in state if k not in first]:
        t = state[name]
        key = (t.data_ptr(), tuple(t.shape))
        # Meta tensors (blocks written to files) all have data_ptr 0 and are never tied.
        if t.numel() and not t.is_meta and key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().contiguous()
    return out


def verify_checkpoint(path: Path, format_version: int = FORMAT_VERSION) -> None:
    """Refuse a checkpoint whose files differ from its manifest (changed, truncated,
    missing) with one line naming the file. Format 3 and later always write a manifest, so
    one without it is incomplete; older ones, which wrote none, are trusted with a warning
    that names the format they record."""
    manifest = path / MANIFEST
    if not manifest.is_file() and format_version >= 3:
        raise CompensatorError(
            f"{path} has no {MANIFEST}, which every format-{format_version} checkpoint has: it "
            "is incomplete or was changed, and its files cannot be checked; quantize again"
        )
    if not manifest.is_file():
        log.warning(
            "%s is a format-%d checkpoint (before manifests): its files cannot be checked",
            path,
            format_version,
        )
        return
    try:
        entries = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        raise CompensatorError(f"{manifest} is damaged; the checkpoint cannot be checked") from None
    for name, entry in entries.items():
        f = path / name
        if not f.is_file():
            raise CompensatorError(f"{f} is missing; the checkpoint is incomplete")
        if f.stat().st_size != entry["bytes"]:
            raise CompensatorError(
                f"{f} has {f.stat().st_size} bytes, not the {entry['bytes']} its manifest "
                "records (truncated or changed); the checkpoint is damaged"
            )
        if file_sha256(f) != entry["sha256"]:
            raise CompensatorError(
                f"{f} differs from the checkpoint's manifest (sha256); the checkpoint is damaged"
            )


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CompensatorError(f"no checkpoint directory at {path}")
    if not is_checkpoint(path):
        raise CompensatorError(
            f"{path} is not a compensator checkpoint (config.json has no "
            f"quantization_config.quant_method == {QUANT_METHOD!r}); quantize a model first"
        )
    config = json.loads((path / "config.json").read_text())
    qc = config["quantization_config"]
    version = qc.get("format_version", 1)  # format 1 recorded none
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CompensatorError(f"{path}/config.json records format_version {version!r}; damaged")
    if version > FORMAT_VERSION:
        raise CompensatorError(
            f"{path} was written by a newer compensator (format {version}); upgrade"
        )
    verify_checkpoint(path, version)
    return config


def load_checkpoint(path: str | Path, *, device: str | torch.device = "cpu") -> nn.Module:
    """A transformers model whose quantized Linears are the layers their records name."""
    path = Path(path)
    t0 = time.perf_counter()
    config_dict = read_quantization_config(path)
    qc = config_dict.pop("quantization_config")
    if not (path / WEIGHTS_FILE).is_file():
        raise CompensatorError(f"{path} has no {WEIGHTS_FILE}; the checkpoint is incomplete")
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    dtype = getattr(torch, str(qc.get("dtype", "float32")))
    # The saved class, not the model type's default (a Gemma3ForCausalLM has a gemma3 config).
    arch = (config_dict.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    with no_init_weights():
        if cls is not None and hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if (qc.get("experts") or {}).get("layout") == "unfused":
        unfuse_experts(model)
    state = load_file(str(path / WEIGHTS_FILE))
    records = qc.get("layers") or _legacy_records(qc, state)
    for name in qc["modules"]:
        linear = model.get_submodule(name)
        layer = layer_from_record(records[name], linear.in_features, linear.out_features)
        replace_module(model, name, layer)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # shapes that contradict the records
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln), "")
        raise CompensatorError(
            f"{path / WEIGHTS_FILE} does not match its config.json ({first[:200]}); the "
            "checkpoint is damaged"
        ) from None
    # Tied weights (lm_head = embeddings) are stored once and re-tied here.
    model.tie_weights()
    missing = [k for k in missing if not _is_tied(model, k)]
    if missing or unexpected:
        raise CompensatorError(
            f"{path / WEIGHTS_FILE} does not match its config.json "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); the checkpoint is damaged"
        )
    model.eval().to(device)
    log.info(
        "loaded %s (%d quantized layers) in %.1fs",
        path,
        len(qc["modules"]),
        time.perf_counter() - t0,
    )
    return model


def _legacy_records(qc: dict[str, Any], state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-layer records of a format 1/2 checkpoint (one spec for the model; rank and
    rotation sizes read off the tensors' shapes)."""
    storage = dict(qc.get("storage") or {})
    records: dict[str, Any] = {}
    for name in qc["modules"]:
        rot = state.get(f"{name}.rot_left"), state.get(f"{name}.rot_right")
        common = {
            "activations": qc.get("activations"),
            "rotation": None if rot[0] is None else [len(rot[0]), len(rot[1])],
            "bias": f"{name}.bias" in state,
        }
        if storage.get("format") == "vq":
            spec = {k: v for k, v in storage.items() if k != "format"}
            records[name] = {"format": "vq", "spec": spec, **common}
            continue
        lr_a = state.get(f"{name}.lr_a")
        records[name] = {
            "format": "uniform",
            "spec": qc["weights"],
            "rank": 0 if lr_a is None else lr_a.shape[1],
            "factor_bits": 16 if lr_a is None or lr_a.is_floating_point() else 8,
            "lowrank_input": qc.get("lowrank_input") or "quantized",
            **common,
        }
    return records


def _is_tied(model: nn.Module, key: str) -> bool:
    """Whether missing ``key`` is a tied copy of the input embedding (stored once, under the
    embedding's name), not the embedding itself."""
    if not key.endswith(".weight"):
        return False
    module = model.get_submodule(key.rsplit(".", 1)[0])
    emb = model.get_input_embeddings()
    if module is emb:
        return False
    return getattr(model.config, "tie_word_embeddings", False) and module.weight is emb.weight


@register_format
class Native(Format):
    """compensator's own checkpoint: holds every layer format, loads with compensator.load."""

    name: ClassVar[str] = "native"
    holds_split_experts: ClassVar[bool] = True
    summary: ClassVar[str] = "compensator's checkpoint (every layer kind; compensator.load)"

    def refusal(self, name: str, record: dict[str, Any]) -> str | None:
        return None

    def write(self, source: ExportSource, target: Path) -> None:
        write_checkpoint(
            source.model, source.quantization_config, target, tokenizer=source.tokenizer
        )
