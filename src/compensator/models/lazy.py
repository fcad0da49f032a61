"""A local safetensors model opened without reading its weights.

The model is built on the meta device (accelerate's ``init_empty_weights``; buffers such as
rotary frequencies are computed as usual), and :class:`LazyWeights` reads the tensors of one
module at a time from the files, each opened (memory-mapped) only for that read and closed
after, so that pages of blocks already done do not stay resident. The pipeline materializes
what lies outside the blocks once, and each block only while it is quantized; the quantized
block goes to the run state's files and back to the meta device (issue 17).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from compensator.errors import CompensatorError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"


_FLOAT_FILES = {"F16", "BF16", "F32", "F64"}


class LazyWeights:
    """Which file holds each tensor of a local safetensors model, and reads on demand."""

    def __init__(self, directory: Path, dtype: torch.dtype) -> None:
        self.directory = directory
        self.dtype = dtype
        self.files: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}
        for path in _weight_files(directory):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():  # noqa: SIM118  (safe_open is not a mapping)
                        info = f.get_slice(name)
                        self.files[name] = path
                        self.shapes[name] = tuple(info.get_shape())
                        self.dtypes[name] = info.get_dtype()
            except (OSError, SafetensorError) as err:
                raise CompensatorError(
                    f"cannot read '{path}': {' '.join(str(err).split())}; the file is "
                    "truncated or damaged: copy or download it again"
                ) from None

    def mismatch(self, model: nn.Module) -> str | None:
        """Why ``model`` cannot be read from the files tensor by tensor (then it must be
        loaded whole, through transformers' renaming and dequantizing), or None: names or
        shapes that differ, tensors the model does not have (quantization scales, old
        names), non-float files for float tensors, a quantized checkpoint's config."""
        if getattr(getattr(model, "config", None), "quantization_config", None):
            return "its config.json declares a quantization_config"
        tied = _tied_names(model)
        state = model.state_dict(keep_vars=True)
        for name, t in state.items():
            if name in tied or not (t.is_meta or name in self.files):
                continue
            if name not in self.files:
                return f"{name} is not in the files"
            if self.shapes[name] != tuple(t.shape):
                return f"{name} has shape {self.shapes[name]} in the files, {tuple(t.shape)} in the model"
            if t.is_floating_point() and self.dtypes[name] not in _FLOAT_FILES:
                return f"{name} is {self.dtypes[name]} in the files"
        extra = sorted(set(self.files) - set(state))
        return f"the files hold {extra[0]}, which the model has not" if extra else None

    def materialize(
        self, module: nn.Module, prefix: str = "", skip: nn.Module | None = None
    ) -> None:
        """Read every parameter of ``module`` still on the meta device, and every buffer
        the files hold (named ``prefix + name`` there), except those inside ``skip``; each
        file is opened once for this call."""
        skipped = set() if skip is None else {id(t) for t in (*skip.parameters(), *skip.buffers())}
        wanted: dict[str, tuple[nn.Module, str]] = {}
        for owner_name, owner in module.named_modules():
            for kind in ("_parameters", "_buffers"):
                for local, t in getattr(owner, kind).items():
                    if t is None or id(t) in skipped:
                        continue
                    full = prefix + ".".join(x for x in (owner_name, local) if x)
                    if full not in self.files or (kind == "_parameters" and not t.is_meta):
                        continue  # a tied weight (re-tied by the caller), or a computed buffer
                    wanted[full] = (owner, local)
        for full, t in self.read(list(wanted)):
            owner, local = wanted[full]
            if t.is_floating_point():
                t = t.to(self.dtype)
            if local in owner._parameters:
                old = owner._parameters[local]
                owner._parameters[local] = nn.Parameter(t, requires_grad=old.requires_grad)
            else:
                owner._buffers[local] = t

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """The named tensors as the files hold them, each file opened once."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for path, some in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for name in some:
                    yield name, f.get_tensor(name)


def _weight_files(directory: Path) -> list[Path]:
    index = directory / INDEX_FILE
    if not index.is_file():
        return sorted(directory.glob("*.safetensors"))
    try:
        return sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CompensatorError(
            f"cannot read '{index}' ({type(err).__name__}: {err}); it should map tensor names "
            "to files under 'weight_map': copy or download it again"
        ) from None


def release(module: nn.Module) -> None:
    """Drop ``module``'s parameters and persistent buffers (to the meta device): they are on
    disk. Non-persistent buffers (computed at construction, in no file) stay."""
    for owner in module.modules():
        for name, p in owner._parameters.items():
            if p is not None:
                owner._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
        for name, b in owner._buffers.items():
            if b is not None and name not in owner._non_persistent_buffers_set:
                owner._buffers[name] = b.to("meta")


@contextmanager
def materialized(weights: LazyWeights | None, block: nn.Module, prefix: str) -> Iterator[None]:
    """``block`` with its weights read in, released after (no-op without ``weights``)."""
    if weights is None:
        yield
        return
    weights.materialize(block, prefix)
    try:
        yield
    finally:
        release(block)


def _tied_names(model: nn.Module) -> set[str]:
    """State-dict names that are another name's tensor (lm_head tied to the embedding)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:
            tied.add(name)
        else:
            seen[id(t)] = name
    return tied


def has_meta_tensors(module: nn.Module) -> bool:
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def wants_lazy(lazy: bool | None, local: bool, transforms: bool, has_state: bool) -> bool:
    """Whether to open a model lazily: asked for, or by default whenever it can be (``local``
    files: a safetensors directory or a GGUF; a run state to write blocks to; no whole-model
    transform)."""
    possible = local and has_state and not transforms
    if lazy is None:
        return possible
    if lazy and not possible:
        raise CompensatorError(
            "lazy=True needs a local safetensors directory or GGUF, a resume=DIR to write each "
            "finished block to, and a recipe without whole-model transforms (quarot-*)"
        )
    return lazy
