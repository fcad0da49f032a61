"""Block inputs: capturing them at block 0 and running a block over a stream of batches."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from compensator.nn.rotated import rotate_input
from compensator.pipeline.storage import Storage

# Where blocks and the weights outside them wait while another block is worked on.
PARK = torch.device("cpu")


class StopForward(Exception):
    """Raised from a hook once everything needed from a forward pass has been seen."""


@dataclass
class Stream:
    """Inputs of one block for every calibration batch, with the keyword arguments the
    model passed to its blocks (position embeddings, masks), which differ per batch only
    in their batch dimension."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def replaced(self, hidden: list[torch.Tensor]) -> Stream:
        return Stream(hidden, self.kwargs)


Memo = dict[int, tuple[torch.Tensor, torch.Tensor]]


def to_device(value: Any, device: torch.device, memo: Memo | None = None) -> Any:
    """``value`` with its tensors on ``device``; with a ``memo``, a tensor met again (the
    rotary embeddings every block is passed) is moved once and shared. The memo holds the
    original too, so that its id cannot be reused by another tensor while it is kept."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device))
        return memo[id(value)][1]
    if isinstance(value, dict):
        return {k: to_device(v, device, memo) for k, v in value.items()}
    if isinstance(value, list):
        return [to_device(v, device, memo) for v in value]
    if isinstance(value, tuple):
        moved = [to_device(v, device, memo) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    return value


def _move_outside(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> None:
    """Move every parameter and buffer that is not inside a decoder block to ``device``."""
    inside = {id(t) for t in blocks.parameters()} | {id(t) for t in blocks.buffers()}
    for module in model.modules():
        for p in list(module.parameters(recurse=False)):
            if id(p) not in inside:
                p.data = p.data.to(device)
        for name, b in list(module.named_buffers(recurse=False)):
            if id(b) not in inside:
                module._buffers[name] = b.to(device)


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device,
    storage: Storage,
) -> tuple[list[torch.Tensor], list[list[dict[str, Any]]]]:
    """Block 0's inputs per batch, and the keyword arguments the model passes to *each* block.

    The keyword arguments differ between blocks in some families (Gemma 2/3 and Qwen2 with
    sliding windows pass per-layer masks and rotary embeddings), so every block's are kept.
    While capturing, each block's forward is swapped for a pass-through that records them,
    and the model stops after the last block (no lm_head).
    """
    hidden: list[torch.Tensor] = []
    per_block: list[list[dict[str, Any]]] = [[] for _ in blocks]
    # The model passes the same mask and rotary tensors to every block: stored once per batch
    # (on a GPU with CPU storage, 80 blocks x 16 batches of 2048-token rotary tables would
    # otherwise be 80 copies, 21 GB, for a Llama-3-70B).
    memo: Memo = {}

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kw: Any) -> Any:
            h = args[0] if args else kw.pop("hidden_states")
            if index == 0:
                hidden.append(storage.put(h))
            kw = {k: v for k, v in kw.items() if k not in ("past_key_values", "past_key_value")}
            kw["use_cache"] = False
            if index == 0:
                memo.clear()  # a new batch
            per_block[index].append(to_device(kw, storage.device, memo))
            if index == len(blocks) - 1:
                raise StopForward
            return h

        return forward

    _move_outside(model, blocks, device)
    for i, block in enumerate(blocks):
        block.forward = recorder(i)  # instance attribute shadows the class's forward
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            with contextlib.suppress(StopForward):
                model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
    finally:
        for block in blocks:
            del block.forward
        _move_outside(model, blocks, PARK)
    return hidden, per_block


def block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


class BatchReuse(Protocol):
    """What a pass may skip recomputing for one batch (see :mod:`compensator.pipeline.reuse`)."""

    def batch(self, b: int, device: torch.device) -> contextlib.AbstractContextManager[None]: ...

    def captured(self, names: Collection[str]) -> contextlib.AbstractContextManager[None]: ...

    def known_inputs(
        self, names: list[str], b: int, device: torch.device
    ) -> dict[str, torch.Tensor] | None: ...

    def one_input(self, names: list[str]) -> bool: ...

    def record_inputs(self, names: list[str], seen: dict[str, torch.Tensor]) -> None: ...


def _batch(reuse: BatchReuse | None, b: int, device: torch.device) -> Any:
    return contextlib.nullcontext() if reuse is None else reuse.batch(b, device)


@torch.no_grad()
def run_block(
    block: nn.Module,
    stream: Stream,
    device: torch.device,
    storage: Storage,
    reuse: BatchReuse | None = None,
) -> list[torch.Tensor]:
    out = []
    for b, (h, kw) in enumerate(zip(stream.hidden, stream.kwargs, strict=True)):
        with _batch(reuse, b, device):
            out.append(storage.put(block_output(block(h.to(device), **to_device(kw, device)))))
    return out


@torch.no_grad()
def capture_linear_inputs(
    block: nn.Module,
    names: list[str],
    hidden: torch.Tensor,
    kwargs: dict[str, Any],
    device: torch.device,
    reuse: BatchReuse | None = None,
    b: int = 0,
    routed: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Inputs of the named Linears for one batch (after a Linear's online rotation, what its
    weight multiplies); the forward stops once all were seen. ``routed`` Linears (experts)
    may receive no token in a batch and are then absent. Where an earlier batch showed that
    all of them read one tensor (``reuse``), the forward stops at the first."""
    # What the group read in earlier passes or batches (experts' tokens vary by batch: not theirs).
    known_from = None if routed else reuse
    if known_from is not None:
        known = known_from.known_inputs(names, b, device)
        if known is not None:
            return known
    seen: dict[str, torch.Tensor] = {}
    one = known_from is not None and known_from.one_input(names)

    def hook_for(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple) -> None:
            seen[name] = rotate_input(m, args[0])
            if one:
                seen.update(dict.fromkeys(names, seen[name]))
            if len(seen) == len(names):
                raise StopForward

        return hook

    captured = contextlib.nullcontext() if reuse is None else reuse.captured(names)
    with _batch(reuse, b, device), captured:
        handles = [block.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
        try:
            block(hidden.to(device), **to_device(kwargs, device))
        except StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
    missing = set(names) - seen.keys() - set(routed)
    if missing:
        raise RuntimeError(f"Linear layers {sorted(missing)} were not called by the block forward")
    if known_from is not None:
        known_from.record_inputs(names, seen)
    return seen
